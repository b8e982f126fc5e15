"""bf16 autocast on a CPU: speed and learning quality against fp32, same data, steps and seeds.

For each policy, trains with `train.amp=none` (seeds 0 and 1: the seed-to-seed spread is the yardstick)
and `train.amp=bf16` (seed 0) through the one trainer, then scores every final policy in fp32 on the
held-out episodes with fixed windows and fixed noise (`trainer.validation_loss`, 16 batches). bf16
"keeps learning quality" when |val(bf16) - val(fp32, seed 0)| is within the fp32 seed-to-seed spread.

    python scripts/experiments/amp_cpu.py --dataset runs/compare_lerobot/protege.zarr --steps 400

Prints a markdown table; writes JSON (--out). Last line: `<policy>_speedup=<x> <policy>_val_ratio=<y> ...`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from protege.cli import compose
from protege.datasets.loader import load_buffer
from protege.datasets.sampler import SequenceSampler, split_episodes
from protege.training.trainer import train, validation_loss

POLICIES = {
    # name: (overrides, obs keys)
    "act_small": (["policy=act_small", "train.lr=1e-4", "train.batch_size=8"], ["obs/state", "obs/top"]),
    "act": (["policy=act", "train.lr=1e-5", "train.weight_decay=1e-4", "train.batch_size=8"], ["obs/state", "obs/top"]),
    "diffusion": (["policy=diffusion", "train.batch_size=64"], ["obs/state", "obs/environment_state"]),
}


def run(name: str, dataset: str, steps: int, amp: str, seed: int, threads: int) -> dict:
    overrides, keys = POLICIES[name]
    task = "aloha_transfer_cube" if "obs/top" in keys else "aloha_transfer_cube_state"
    with tempfile.TemporaryDirectory(prefix="amp-") as run_dir:
        cfg = compose("train", [f"task={task}", f"dataset={dataset}", f"task.obs_keys=[{','.join(keys)}]", *overrides,
                                f"train.steps={steps}", f"train.amp={amp}", f"seed={seed}", "device=cpu", f"run_dir={run_dir}",
                                "train.val_ratio=0.1", "train.val_every=0", "train.ckpt_every=0", "eval.n_episodes=0",
                                f"train.warmup_steps={min(100, steps // 10)}"])
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        res = train(cfg, progress=False)
        wall = time.perf_counter() - t0
    policy = res["policy"]
    buffer, _ = load_buffer(dataset, [*keys, "action"])
    _, val_eps = split_episodes(buffer.n_episodes, 0.1, 0)  # the same held-out episodes for every seed
    sampler = SequenceSampler(buffer, keys, policy.n_obs_steps, policy.horizon, episodes=val_eps)
    step_s = np.asarray(res["step_s"][5:])
    return {"policy": name, "amp": amp, "seed": seed, "steps": steps, "wall_s": wall,
            "step_ms_median": float(np.median(step_s) * 1e3),
            "train_loss_last10pct": float(np.mean(res["losses"][-max(1, steps // 10):])),
            "val_loss": validation_loss(policy, sampler, 32, torch.device("cpu"), seed=123, n_batches=16)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--policies", default="act_small,diffusion")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="amp_cpu.json")
    a = ap.parse_args()
    rows, headline = [], []
    for name in a.policies.split(","):
        r = {tag: run(name, a.dataset, a.steps, amp, seed, a.threads)
             for tag, amp, seed in (("fp32", "none", 0), ("bf16", "bf16", 0), ("fp32_seed1", "none", 1))}
        rows.append(r)
        Path(a.out).write_text(json.dumps(rows, indent=2))
        spread = abs(r["fp32"]["val_loss"] - r["fp32_seed1"]["val_loss"])
        gap = abs(r["bf16"]["val_loss"] - r["fp32"]["val_loss"])
        r["verdict"] = {"speedup": r["fp32"]["step_ms_median"] / r["bf16"]["step_ms_median"],
                        "val_ratio": r["bf16"]["val_loss"] / r["fp32"]["val_loss"], "gap": gap, "seed_spread": spread,
                        "keeps_quality": gap <= spread}
        headline.append(f"{name}_speedup={r['verdict']['speedup']:.2f} {name}_val_ratio={r['verdict']['val_ratio']:.3f}")
    Path(a.out).write_text(json.dumps(rows, indent=2))
    print("| policy | run | step ms (median) | train loss (last 10%) | held-out loss (fp32 eval) |")
    print("|---|---|---|---|---|")
    for r in rows:
        for tag in ("fp32", "fp32_seed1", "bf16"):
            x = r[tag]
            print(f"| {x['policy']} | {tag} | {x['step_ms_median']:.0f} | {x['train_loss_last10pct']:.4f} | {x['val_loss']:.4f} |")
    for r in rows:
        v = r["verdict"]
        print(f"{r['fp32']['policy']}: bf16 {v['speedup']:.2f}x fp32 speed; held-out gap {v['gap']:.4f} vs fp32 seed spread "
              f"{v['seed_spread']:.4f} -> {'keeps' if v['keeps_quality'] else 'does NOT keep'} quality")
    print(" ".join(headline))


if __name__ == "__main__":
    main()
