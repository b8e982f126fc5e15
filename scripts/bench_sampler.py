"""Sampler throughput: vectorised whole-batch gather vs a per-sample torch Dataset baseline.

The baseline is the usual per-sample design (as in diffusion_policy's SequenceDataset): indices are
precomputed, `__getitem__` slices one window, edge-pads it, and the DataLoader collates samples
one by one. Both read the same in-memory replay buffer and produce the same batch.

    python scripts/bench_sampler.py [--batch 256] [--seconds 3] [--out bench_sampler.json]
Last line: speedup_state=<x> speedup_image=<y>
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import zarr

from protege.datasets.replay_buffer import ReplayBuffer
from protege.datasets.sampler import SequenceSampler, to_torch


class PerSampleDataset(torch.utils.data.Dataset):
    def __init__(self, sampler: SequenceSampler) -> None:
        self.s = sampler

    def __len__(self) -> int:
        return len(self.s)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.s
        start, lo, hi = int(s.window_start[i]), int(s.window_lo[i]), int(s.window_hi[i])
        a, b = max(start, lo), min(start + s.horizon, hi)
        out = {}
        for key in [*s.obs_keys, s.action_key]:
            chunk = s.buffer.data[key][a:b]
            before, after = a - start, start + s.horizon - b
            window = np.concatenate([np.repeat(chunk[:1], before, 0), chunk, np.repeat(chunk[-1:], after, 0)])
            out[key] = torch.from_numpy(window[: s.n_obs_steps] if key != s.action_key else window)
        pad = np.zeros(s.horizon, bool)
        pad[: a - start] = True
        pad[b - start :] = True
        out["action_is_pad"] = torch.from_numpy(pad)
        return out


def make_buffer(n_episodes: int, length: int, image: bool, seed: int = 0) -> ReplayBuffer:
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer.create(zarr.storage.MemoryStore(), fps=10)
    for _ in range(n_episodes):
        ep = {"obs/state": rng.standard_normal((length, 39), dtype=np.float32),
              "action": rng.standard_normal((length, 4), dtype=np.float32)}
        if image:
            ep["obs/image"] = rng.integers(0, 255, (length, 96, 96, 3), dtype=np.uint8)
        buf.append_episode(ep)
    return ReplayBuffer.load(buf)


def windows_per_s(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def bench(buffer: ReplayBuffer, obs_keys: list[str], batch: int, seconds: float) -> dict[str, float]:
    sampler = SequenceSampler(buffer, obs_keys, n_obs_steps=2, horizon=16)
    rng = np.random.default_rng(0)
    loader = torch.utils.data.DataLoader(PerSampleDataset(sampler), batch_size=batch, shuffle=True, num_workers=0)
    it = iter(loader)

    def baseline() -> None:
        nonlocal it
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)

    # the two paths must produce identical windows
    idx = np.arange(0, len(sampler), max(1, len(sampler) // 64))
    ref = PerSampleDataset(sampler)
    got = sampler.gather(idx)
    for j, i in enumerate(idx):
        for k, v in ref[int(i)].items():
            assert np.array_equal(v.numpy(), got[k][j]), k
    vec = windows_per_s(lambda: to_torch(sampler.gather(rng.integers(0, len(sampler), batch))), batch, seconds)
    base = windows_per_s(baseline, batch, seconds)
    return {"vectorised_windows_per_s": vec, "per_sample_windows_per_s": base, "speedup": vec / base,
            "n_windows": len(sampler), "batch": batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", default="bench_sampler.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = {
        "state": bench(make_buffer(200, 200, image=False), ["obs/state"], args.batch, args.seconds),
        "image_96x96": bench(make_buffer(50, 200, image=True), ["obs/state", "obs/image"], args.batch, args.seconds),
        "machine": {"cpus": __import__("os").cpu_count(), "torch": torch.__version__},
    }
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for name in ("state", "image_96x96"):
        r = results[name]
        print(f"{name:12s} vectorised {r['vectorised_windows_per_s']:>12,.0f} windows/s   "
              f"per-sample {r['per_sample_windows_per_s']:>10,.0f} windows/s   x{r['speedup']:.1f}")
    print(f"speedup_state={results['state']['speedup']:.1f} speedup_image={results['image_96x96']['speedup']:.1f}")


if __name__ == "__main__":
    main()
