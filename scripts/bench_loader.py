"""Streaming loader at real scale: ACT trained from a camera dataset far larger than a memory budget.

1. Generates (once; resumable, reused from --data) a replay buffer of --episodes x --steps steps with
   --cameras camera-like 240x320 frames (smooth scene, moving objects, sensor noise), 14-D state and
   action, written one episode at a time (memory bounded by one episode), frames stored with the
   buffer's default image storage.
2. Times the loader alone: windows/s the streaming DataLoader (`--workers` processes) delivers for
   act_small's windows.
3. Runs `--train-steps` act_small training steps through `protege train`'s trainer with
   `train.data.in_memory=false`, and reports the fraction of each step spent waiting for data.
Peak RSS is sampled over the whole process tree (this process + DataLoader workers) during 2-3.

    python scripts/bench_loader.py                 # 120 episodes x 400 steps x 2 cameras (22.1 GB decoded)
    python scripts/bench_loader.py --episodes 4    # quick check on a small dataset

Writes the full results as JSON (--out); the last line is
`rss_gb=<x> loader_windows_per_s=<y> data_wait_frac=<z>`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from protege.datasets.loader import WORKER_STARTS, WindowIndexStream, batch_iterator, decoded_nbytes, load_buffer
from protege.datasets.replay_buffer import ReplayBuffer
from protege.datasets.sampler import SequenceSampler

STATE_DIM = 14


def camera_episode(rng: np.random.Generator, steps: int, size: tuple[int, int], n_cams: int) -> dict[str, np.ndarray]:
    """One episode of camera-like frames: a smooth per-episode scene, three objects moving along a
    random walk (the 'robot'), and sensor noise, so JPEG sizes and decode times are those of real
    frames rather than of flat or pure-noise images."""
    h, w = size
    walk = np.cumsum(rng.normal(0, 0.02, (steps, STATE_DIM)), axis=0).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ep = {"obs/state": walk, "action": np.roll(walk, -1, axis=0)}
    noise = rng.normal(0, 3, (16, h, w, 1)).astype(np.int16)  # a bank of noise fields: cheap per frame
    for c in range(n_cams):
        f = rng.uniform(0.5, 3.0, (3, 2))
        scene = np.stack([96 + 60 * np.sin(f[i, 0] * xx / w * np.pi + f[i, 1] * yy / h * np.pi) for i in range(3)],
                         -1).astype(np.int16)
        frames = np.empty((steps, h, w, 3), np.uint8)
        for t in range(steps):
            img = scene + noise[rng.integers(16)]
            for j in range(3):  # objects follow state dimensions, like arms and a cube
                cy = int((0.5 + 0.3 * np.tanh(walk[t, 2 * j + c])) * h)
                cx = int((0.5 + 0.3 * np.tanh(walk[t, 2 * j + 1])) * w)
                img[max(cy - 18, 0):cy + 18, max(cx - 24, 0):cx + 24] = (60 * j + 40, 200 - 50 * j, 90 + 40 * c)
            np.clip(img, 0, 255, out=img)
            frames[t] = img
        ep[f"obs/cam{c}"] = frames
    return ep


def ensure_dataset(path: Path, episodes: int, steps: int, size: tuple[int, int], n_cams: int) -> ReplayBuffer:
    buf = ReplayBuffer.open_or_create(path, fps=50)
    t0, have = time.perf_counter(), buf.n_episodes
    for i in range(have, episodes):  # resumable: each append commits one episode
        buf.append_episode(camera_episode(np.random.default_rng(i), steps, size, n_cams))
        if (i + 1) % 10 == 0 or i + 1 == episodes:
            rate = (i + 1 - have) / (time.perf_counter() - t0)
            print(f"generated {i + 1}/{episodes} episodes ({rate * 60:.1f} episodes/min)", flush=True)
    return ReplayBuffer.open(path)


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants (the DataLoader workers).
    Summed RSS counts pages shared by forked workers once per process: an upper bound."""

    def __init__(self, interval: float = 0.1, pss_every: int = 10) -> None:
        self.peak, self.peak_pss, self.interval, self.pss_every = 0, 0, interval, pss_every
        self.peak_main = self.peak_children = 0  # where the memory goes: this process / its descendants
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, pss: bool = False) -> None:
        """Summed RSS; with `pss`, also the summed proportional set size (shared pages split
        between the processes sharing them: the tree's real footprint; reads smaps, slower)."""
        me = psutil.Process()
        main = me.memory_info().rss
        rss, pss_total = main, me.memory_full_info().pss if pss else 0
        for p in me.children(recursive=True):
            try:
                rss += p.memory_info().rss
                pss_total += p.memory_full_info().pss if pss else 0
            except psutil.NoSuchProcess:
                pass
        self.peak = max(self.peak, rss)
        self.peak_main = max(self.peak_main, main)
        self.peak_children = max(self.peak_children, rss - main)
        self.peak_pss = max(self.peak_pss, pss_total)

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.interval):
            self.sample(pss=i % self.pss_every == 0)
            i += 1

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def time_loader(path: Path, keys: list[str], n_obs_steps: int, horizon: int, batch: int, workers: int,
                seconds: float, worker_start: str) -> dict[str, float]:
    buffer, _ = load_buffer(path, keys, in_memory=False)
    sampler = SequenceSampler(buffer, [k for k in keys if k != "action"], n_obs_steps, horizon)
    t_start = time.perf_counter()
    it = batch_iterator(sampler, WindowIndexStream(len(sampler), batch, seed=0), streaming=True, num_workers=workers,
                        worker_start=worker_start)
    next(it)  # worker start-up is not throughput (reported apart)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)["action"])
    elapsed = time.perf_counter() - t0
    del it
    return {"windows": n, "seconds": elapsed, "windows_per_s": n / elapsed, "first_batch_s": t0 - t_start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/data/loader/bench.zarr"))
    ap.add_argument("--episodes", type=int, default=120)  # x 400 x 2 x 240x320x3 = 22.1 GB decoded
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--size", default="240x320")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--worker-start", default="forkserver", choices=WORKER_STARTS,
                    help="how the DataLoader workers start (train.data.worker_start)")
    ap.add_argument("--loader-seconds", type=float, default=45)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--skip-steps", type=int, default=3, help="first steps left out of the wait fraction (start-up)")
    ap.add_argument("--generate-only", action="store_true", help="write the dataset and stop")
    ap.add_argument("--out", type=Path, default=Path("/work/data/loader/bench_loader.json"))
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides for the training run")
    args = ap.parse_args()
    size = tuple(int(s) for s in args.size.split("x"))

    buf = ensure_dataset(args.data, args.episodes, args.steps, size, args.cameras)
    if args.generate_only:
        return
    if buf.n_episodes > args.episodes:
        buf = ReplayBuffer.open(args.data)  # an existing larger dataset: used whole
    cams = [f"obs/cam{c}" for c in range(args.cameras)]
    keys = ["obs/state", *cams, "action"]
    decoded_gb = decoded_nbytes(buf, keys) / 1e9
    disk_gb = sum(f.stat().st_size for f in args.data.rglob("*") if f.is_file()) / 1e9
    print(f"dataset {args.data}: {buf.n_episodes} episodes, {buf.n_steps} steps, {decoded_gb:.1f} GB decoded, "
          f"{disk_gb:.2f} GB on disk", flush=True)

    from omegaconf import open_dict

    from protege.cli import compose
    from protege.training.trainer import train

    cfg = compose("train", ["task=aloha_transfer_cube", "policy=act_small", f"dataset={args.data}",
                            f"task.obs_keys=[obs/state,{','.join(cams)}]", f"train.batch_size={args.batch}",
                            f"train.steps={args.train_steps}", "train.data.in_memory=false",
                            f"train.data.num_workers={args.workers}", f"train.data.worker_start={args.worker_start}",
                            "eval.n_episodes=0", "train.val_ratio=0",
                            "train.ckpt_every=0", "train.log_every=10", *args.overrides])
    with open_dict(cfg):
        cfg.run_dir = str(args.out.parent / "bench_run")
    with PeakRSS() as rss:
        loader = time_loader(args.data, keys, cfg.policy.get("n_obs_steps", 1), cfg.policy.chunk_size, args.batch,
                             args.workers, args.loader_seconds, args.worker_start)
        print(f"loader alone: {loader['windows_per_s']:.0f} windows/s ({args.workers} {args.worker_start} workers, batch "
              f"{args.batch}; first batch after {loader['first_batch_s']:.1f} s)", flush=True)
        result = train(cfg, progress=False)
    wait, step = result["data_wait_s"][args.skip_steps:], result["step_s"][args.skip_steps:]
    wait_frac = sum(wait) / sum(step)
    out = {
        "dataset": str(args.data), "episodes": buf.n_episodes, "steps": buf.n_steps, "cameras": args.cameras,
        "frame_size": list(size), "decoded_gb": decoded_gb, "disk_gb": disk_gb,
        "image_storage": buf.attrs.get("image_storage", "raw (Blosc/zstd)"), "workers": args.workers,
        "worker_start": args.worker_start,
        "batch": args.batch, "loader": loader, "train_steps": len(result["step_s"]),
        "step_s_median": float(np.median(step)), "data_wait_s_median": float(np.median(wait)),
        "data_wait_frac": wait_frac, "peak_rss_gb": rss.peak / 2**30, "peak_pss_gb": rss.peak_pss / 2**30,
        "peak_rss_main_gb": rss.peak_main / 2**30, "peak_rss_children_gb": rss.peak_children / 2**30,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"act_small step {out['step_s_median'] * 1e3:.0f} ms median, waiting for data {out['data_wait_s_median'] * 1e3:.1f} ms "
          f"median; peak summed RSS {out['peak_rss_gb']:.2f} GB, PSS {out['peak_pss_gb']:.2f} GB (peaks apart: "
          f"training process {out['peak_rss_main_gb']:.2f} GB, its children {out['peak_rss_children_gb']:.2f} GB)")
    print(f"rss_gb={out['peak_rss_gb']:.2f} loader_windows_per_s={loader['windows_per_s']:.0f} data_wait_frac={wait_frac:.4f}")


if __name__ == "__main__":
    main()
