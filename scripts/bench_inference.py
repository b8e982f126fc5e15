"""Policy latency for one observation (batch 1) on this machine: median and p99 of predict_action.

Policies are built from the shipped configs (CPU-sized defaults) with Meta-World push-v3 shapes
(39-D state, 4-D action, 2 observation steps); weights are random (latency does not depend on them).

    python scripts/bench_inference.py [--iters 200] [--threads 2] [--out bench_inference.json]
Last line: diffusion_ddim10_ms=<median> diffusion_ddpm100_ms=<median> bc_ms=<median>
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from protege.cli import compose
from protege.policies import build_policy

SHAPE_META = {"obs/state": {"shape": [39], "kind": "state"}, "action": {"shape": [4], "kind": "action"}}


def make(policy: str, *overrides: str) -> torch.nn.Module:
    cfg = compose("train", [f"policy={policy}", *overrides])
    p = build_policy(cfg.policy, SHAPE_META)
    rng = np.random.default_rng(0)
    p.normalizer.fit({"obs/state": rng.standard_normal((1000, 39)), "action": rng.uniform(-1, 1, (1000, 4))})
    return p.eval()


def latency_ms(policy: torch.nn.Module, iters: int) -> dict[str, float]:
    obs = {"obs/state": torch.randn(1, policy.n_obs_steps, 39)}
    with torch.inference_mode():
        for _ in range(max(5, iters // 20)):
            policy.predict_action(obs)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            policy.predict_action(obs)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(times)), "p99_ms": float(np.percentile(times, 99)),
            "params": sum(p.numel() for p in policy.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_inference.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = {
        "diffusion_ddim10": make("diffusion", "policy.inference_scheduler=ddim", "policy.num_inference_steps=10"),
        "diffusion_ddpm100": make("diffusion", "policy.inference_scheduler=ddpm", "policy.num_inference_steps=100"),
        "bc": make("bc"),
        # context rows: a 2-level U-Net (fewer ops) and the paper-size U-Net, both DDIM-10
        "diffusion_ddim10_2level": make("diffusion", "policy.down_dims=[32,64]"),
        "diffusion_paper_ddim10": make("diffusion_paper", "policy.inference_scheduler=ddim", "policy.num_inference_steps=10"),
    }
    slow = ("ddpm", "paper")
    results = {name: latency_ms(pol, max(20, args.iters // 5) if any(w in name for w in slow) else args.iters)
               for name, pol in cases.items()}
    results["machine"] = {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for name in cases:
        r = results[name]
        print(f"{name:20s} median {r['median_ms']:8.2f} ms   p99 {r['p99_ms']:8.2f} ms   params {r['params']:,}")
    print(" ".join(f"{n}_ms={results[n]['median_ms']:.2f}" for n in ("diffusion_ddim10", "diffusion_ddpm100", "bc")))


if __name__ == "__main__":
    main()
