"""Policy latency for one observation (batch 1) on this machine: median and p99 of predict_action.

Policies are built from the shipped configs with random weights (latency does not depend on them):
state policies with Meta-World push-v3 shapes (39-D state, 4-D action, 2 observation steps); ACT with
ALOHA shapes (14-D joint state and action, one `top` camera at 240x320 and at 96x128), one forward
pass per chunk of 100 actions.

    python scripts/bench_inference.py [--iters 200] [--threads 2] [--out bench_inference.json]
Last line: diffusion_ddim10_ms=<median> diffusion_ddpm100_ms=<median> bc_ms=<median> act_240x320_ms=<median> act_96x128_ms=<median>
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


def aloha_meta(h: int, w: int) -> dict:
    return {"obs/state": {"shape": [14], "kind": "state"}, "obs/top": {"shape": [h, w, 3], "kind": "image"},
            "action": {"shape": [14], "kind": "action"}}


def make(policy: str, *overrides: str, shape_meta: dict = SHAPE_META) -> torch.nn.Module:
    cfg = compose("train", [f"policy={policy}", *overrides])
    p = build_policy(cfg.policy, shape_meta)
    rng = np.random.default_rng(0)
    p.normalizer.fit({k: rng.standard_normal((1000, *m["shape"])) for k, m in shape_meta.items() if m["kind"] != "image"})
    return p.eval()


def latency_ms(policy: torch.nn.Module, iters: int) -> dict[str, float]:
    obs = {k: torch.randint(0, 256, (1, policy.n_obs_steps, *m["shape"]), dtype=torch.uint8) if m["kind"] == "image"
           else torch.randn(1, policy.n_obs_steps, *m["shape"]) for k, m in policy.shape_meta.items() if m["kind"] != "action"}
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
    p.add_argument("--only", default="", help="comma-separated substrings: run only the matching cases (e.g. act)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    builders = {
        "diffusion_ddim10": lambda: make("diffusion", "policy.inference_scheduler=ddim", "policy.num_inference_steps=10"),
        "diffusion_ddpm100": lambda: make("diffusion", "policy.inference_scheduler=ddpm", "policy.num_inference_steps=100"),
        "bc": lambda: make("bc"),
        # context rows: a 2-level U-Net (fewer ops) and the paper-size U-Net, both DDIM-10
        "diffusion_ddim10_2level": lambda: make("diffusion", "policy.down_dims=[32,64]"),
        "diffusion_paper_ddim10": lambda: make("diffusion_paper", "policy.inference_scheduler=ddim", "policy.num_inference_steps=10"),
        # ACT, paper size (hidden 512): one pass per 100-action chunk
        "act_240x320": lambda: make("act", shape_meta=aloha_meta(240, 320)),
        "act_96x128": lambda: make("act", shape_meta=aloha_meta(96, 128)),
        "act_small_96x128": lambda: make("act_small", shape_meta=aloha_meta(96, 128)),
    }
    wanted = [w for w in args.only.split(",") if w]
    cases = {name: build() for name, build in builders.items() if not wanted or any(w in name for w in wanted)}
    slow = ("ddpm", "paper", "act")
    results = {name: latency_ms(pol, max(20, args.iters // 5) if any(w in name for w in slow) else args.iters)
               for name, pol in cases.items()}
    results["machine"] = {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for name in cases:
        r = results[name]
        print(f"{name:20s} median {r['median_ms']:8.2f} ms   p99 {r['p99_ms']:8.2f} ms   params {r['params']:,}")
    headline = ("diffusion_ddim10", "diffusion_ddpm100", "bc", "act_240x320", "act_96x128")
    print(" ".join(f"{n}_ms={results[n]['median_ms']:.2f}" for n in headline if n in results))


if __name__ == "__main__":
    main()
