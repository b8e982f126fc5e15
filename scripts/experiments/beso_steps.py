"""BESO few-step sampling vs Diffusion Policy DDPM-100 / DDIM-10: success and batch-1 latency.

Trains BESO and Diffusion Policy (same U-Net, same task, demos, steps and batch size) with the one
trainer, then evaluates BESO with 1, 3 and 10 Euler steps and DP with DDPM-100 and DDIM-10 on the same
evaluation seeds. Latency: predict_action on one observation, all variants timed round-robin in one
loop (side by side, so machine load affects them alike). Claim checked (Reuss et al. 2023): BESO with
3 steps is within 5 % of the many-step success at >= 3x lower latency than DDPM-100.

    python scripts/experiments/beso_steps.py [--task pointmass_bimodal] [--steps 1500] [--episodes 100]
Prints a markdown table and a last line of key=value figures; writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict

from protege.cli import compose
from protege.training.checkpoint import load_config, load_policy
from protege.training.trainer import run_eval, train

NET = ["policy.down_dims=[32,64]", "policy.step_embed_dim=32"]
VARIANTS = {  # name -> (run, policy overrides at evaluation)
    "beso_1": ("beso", {"num_inference_steps": 1}),
    "beso_3": ("beso", {"num_inference_steps": 3}),
    "beso_10": ("beso", {"num_inference_steps": 10}),
    "dp_ddpm100": ("diffusion", {"inference_scheduler": "ddpm", "num_inference_steps": 100}),
    "dp_ddim10": ("diffusion", {"inference_scheduler": "ddim", "num_inference_steps": 10}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="pointmass_bimodal")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--latency-iters", type=int, default=50)
    p.add_argument("--work", default="runs/exp_beso")
    p.add_argument("--out", default="runs/exp_beso/results.json")
    args = p.parse_args()
    work = Path(args.work)
    t_start = time.perf_counter()
    ckpts, train_s = {}, {}
    for policy in ("beso", "diffusion"):
        cfg = compose("train", [f"task={args.task}", f"policy={policy}", *NET, f"train.steps={args.steps}",
                                f"train.batch_size={args.batch_size}", "eval.n_episodes=0", "train.val_every=0",
                                "eval.video=false", f"task.dataset={work / 'demos.zarr'}"])
        with open_dict(cfg):
            cfg.run_dir = str(work / policy)
        res = train(cfg, progress=False)
        ckpts[policy], train_s[policy] = res["checkpoint"], res["train_time_s"]

    policies, results = {}, {}
    for name, (run, over) in VARIANTS.items():
        cfg = load_config(ckpts[run])
        cfg = OmegaConf.merge(cfg, {"policy": over, "eval": {"n_episodes": args.episodes}})
        policies[name] = load_policy(ckpts[run], cfg)
        summary = run_eval(cfg, policies[name], work / f"eval_{name}.json", video=False, progress=False)
        results[name] = {"success_rate": summary["success_rate"], "route_counts": summary.get("route_counts", {}),
                         "n_episodes": summary["n_episodes"]}

    dim = int(load_config(ckpts["beso"]).shape_meta["obs/state"]["shape"][0])
    obs = {"obs/state": torch.zeros(1, 2, dim)}
    times: dict[str, list[float]] = {n: [] for n in policies}
    with torch.inference_mode():
        for it in range(args.latency_iters + 5):
            for n, pol in policies.items():  # round-robin: every variant sees the same machine load
                t0 = time.perf_counter()
                pol.predict_action(obs)
                if it >= 5:
                    times[n].append((time.perf_counter() - t0) * 1e3)
    for n in policies:
        results[n]["latency_ms_median"] = float(np.median(times[n]))

    many = max(results["dp_ddpm100"]["success_rate"], results["beso_10"]["success_rate"])
    headline = {
        "beso3_success": results["beso_3"]["success_rate"],
        "many_step_success": many,
        "beso3_within_5pct": results["beso_3"]["success_rate"] >= 0.95 * many,
        "latency_ratio_ddpm100_over_beso3": results["dp_ddpm100"]["latency_ms_median"] / results["beso_3"]["latency_ms_median"],
        "latency_ratio_ddim10_over_beso3": results["dp_ddim10"]["latency_ms_median"] / results["beso_3"]["latency_ms_median"],
    }
    out = {"task": args.task, "train_steps": args.steps, "batch_size": args.batch_size, "eval_episodes": args.episodes,
           "train_time_s": train_s, "results": results, "headline": headline,
           "wall_time_s": time.perf_counter() - t_start, "note": "2-core CPU shared with other jobs; latencies measured round-robin"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{args.task}, {args.steps} training steps, {args.episodes} eval episodes\n")
    print("| variant | success | routes up/down | batch-1 latency (median ms) |\n|---|---|---|---|")
    for n, r in results.items():
        rc = r["route_counts"]
        print(f"| {n} | {r['success_rate']:.2f} | {rc.get('up', '-')}/{rc.get('down', '-')} | {r['latency_ms_median']:.1f} |")
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
