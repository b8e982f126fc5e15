"""Policy latency for one observation (batch 1) on this machine: median and p99 of predict_action.

Policies are built from the shipped configs with random weights (latency does not depend on them):
state policies with Meta-World push-v3 shapes (39-D state, 4-D action, 2 observation steps); ACT with
ALOHA shapes (14-D joint state and action, one `top` camera at 240x320 and at 96x128), one forward
pass per chunk of 100 actions.

Diffusion Policy DDIM-10 runs through the inference runtime `protege eval` / `protege run` use
(`--runtime`, default auto = ONNX Runtime, `protege/policies/export.py`); `--compare eager,aoti`
adds rows for the same weights on other runtimes, timed alternately with it (rounds of 10 calls)
so their ratio comes from one run on the same machine load.

    python scripts/bench_inference.py [--iters 200] [--threads 2] [--out bench_inference.json]
    python scripts/bench_inference.py --only ddim10 --compare eager,aoti --threads 1
Last line: diffusion_ddim10_ms=<median> diffusion_ddpm100_ms=<median> bc_ms=<median> act_240x320_ms=<median> act_96x128_ms=<median>
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
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


def observation(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.randint(0, 256, (1, policy.n_obs_steps, *m["shape"]), dtype=torch.uint8) if m["kind"] == "image"
            else torch.randn(1, policy.n_obs_steps, *m["shape"]) for k, m in policy.shape_meta.items() if m["kind"] != "action"}


def latency_ms(policies: dict[str, torch.nn.Module], iters: int, round_size: int = 10) -> dict[str, dict[str, float]]:
    """Batch-1 predict_action latency of each policy, timed alternately in rounds of `round_size` calls."""
    obs = {name: observation(p) for name, p in policies.items()}
    times: dict[str, list[float]] = {name: [] for name in policies}
    with torch.inference_mode():
        for name, p in policies.items():
            for _ in range(max(5, iters // 20)):
                p.predict_action(obs[name])
        for _ in range(max(1, iters // round_size)):
            for name, p in policies.items():
                for _ in range(round_size):
                    t0 = time.perf_counter()
                    p.predict_action(obs[name])
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)),
                   "params": sum(q.numel() for q in policies[name].parameters())} for name, t in times.items()}


def with_runtime(policy: torch.nn.Module, runtime: str, cache_dir: str) -> torch.nn.Module:
    used = policy.accelerate(cache_dir, runtime)
    if used != runtime and runtime != "auto":
        raise SystemExit(f"bench_inference: runtime {runtime!r} unavailable (see the log line above)")
    policy.runtime = used
    return policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_inference.json")
    p.add_argument("--only", default="", help="comma-separated substrings: run only the matching cases (e.g. act)")
    p.add_argument("--runtime", default="auto", help="Diffusion Policy DDIM runtime: auto|onnx|aoti|eager (as protege eval)")
    p.add_argument("--compare", default="", help="comma-separated other runtimes timed alternately with it, e.g. eager,aoti")
    p.add_argument("--cache", default=None, help="export cache dir (default: a temporary dir)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cache = args.cache or tempfile.mkdtemp(prefix="bench_inference-")
    others = [rt for rt in args.compare.split(",") if rt]

    def ddim(runtime: str) -> torch.nn.Module:
        torch.manual_seed(0)  # the same weights on every runtime
        return with_runtime(make("diffusion", "policy.inference_scheduler=ddim", "policy.num_inference_steps=10"), runtime, cache)

    builders = {
        "diffusion_ddim10": lambda: ddim(args.runtime),
        **{f"diffusion_ddim10_{rt}": (lambda rt=rt: ddim(rt)) for rt in others},
        "diffusion_ddpm100": lambda: make("diffusion", "policy.inference_scheduler=ddpm", "policy.num_inference_steps=100"),
        "bc": lambda: make("bc"),
        # context rows: a 2-level U-Net (fewer ops) and the paper-size U-Net, both DDIM-10, eager
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
    group = ["diffusion_ddim10", *(f"diffusion_ddim10_{rt}" for rt in others)]
    ddim_group = {n: p for n, p in cases.items() if n in group}
    results = latency_ms(ddim_group, args.iters) if ddim_group else {}
    for name, pol in cases.items():
        if name not in ddim_group:
            results.update(latency_ms({name: pol}, max(20, args.iters // 5) if any(w in name for w in slow) else args.iters))
    for name in ddim_group:
        results[name]["runtime"] = cases[name].runtime
        if name != "diffusion_ddim10" and "diffusion_ddim10" in results:
            results[name]["ratio_to_default"] = results[name]["median_ms"] / results["diffusion_ddim10"]["median_ms"]
    results["machine"] = {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                          "loadavg_1min": os.getloadavg()[0]}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for name in cases:
        r = results[name]
        rt = f"   runtime {r['runtime']}" if "runtime" in r else ""
        ratio = f"   {r['ratio_to_default']:.2f}x the default runtime's time" if "ratio_to_default" in r else ""
        print(f"{name:24s} median {r['median_ms']:8.2f} ms   p99 {r['p99_ms']:8.2f} ms   params {r['params']:,}{rt}{ratio}")
    print(f"load average (1 min) at the end: {results['machine']['loadavg_1min']:.2f} on {os.cpu_count()} cpus")
    headline = ("diffusion_ddim10", "diffusion_ddpm100", "bc", "act_240x320", "act_96x128")
    print(" ".join(f"{n}_ms={results[n]['median_ms']:.2f}" for n in headline if n in results))


if __name__ == "__main__":
    main()
