"""Real-time chunking vs chunk switching vs temporal ensembling under inference delay.

Trains Diffusion Policy on the bimodal point mass (two equally good routes around an obstacle: a new
chunk sampled on its own may pick the other route than the one being executed), or reuses
`--checkpoint`, then evaluates it with simulated inference delays (0, 100, 200, 300 ms at the task's
control rate): a chunk requested at step s is predicted from the observation at s and executed from
step s + d, the env running the current chunk meanwhile (`evaluate(delay_steps=d)`, as the real-time
runner does). Every join sees the same evaluation seeds:

- switch: execute `--execute` steps of each 15-step chunk, then switch to the next one;
- ensemble: ACT's temporal ensembling (m = 0.01), a new chunk whenever none is in flight;
- rtc: as switch, but the next chunk is sampled with the actions executed during the delay frozen
  and the rest of the overlap softly guided (Black et al. 2025; `policies/guidance.py`).

Reports success and the action jerk |Δ³a| at chunk joins (and over all steps).

    python scripts/experiments/rtc.py [--steps 1500] [--episodes 100] [--checkpoint runs/exp_rtc/diffusion]
Prints a markdown table and a last line of key=value figures; writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from protege.cli import compose
from protege.training.checkpoint import load_config, load_policy, resolve_checkpoint
from protege.training.trainer import run_eval, train

NET = ["policy.down_dims=[32,64]", "policy.step_embed_dim=32"]
JOINS = ("switch", "ensemble", "rtc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="pointmass_bimodal")
    p.add_argument("--policy", default="diffusion")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--delays-ms", default="0,100,200,300")
    p.add_argument("--execute", type=int, default=8, help="steps executed of each chunk before the next one is due")
    p.add_argument("--chunk", type=int, default=15, help="actions per predicted chunk (n_action_steps)")
    p.add_argument("--checkpoint", default=None, help="reuse a trained run/checkpoint instead of training")
    p.add_argument("--work", default="runs/exp_rtc")
    p.add_argument("--out", default="runs/exp_rtc/results.json")
    args = p.parse_args()
    work = Path(args.work)
    t_start = time.perf_counter()
    train_s = None
    if args.checkpoint:
        ckpt = resolve_checkpoint(args.checkpoint)
    else:
        cfg = compose("train", [f"task={args.task}", f"policy={args.policy}", *NET, f"train.steps={args.steps}",
                                "eval.n_episodes=0", "train.val_every=0", "eval.video=false",
                                f"task.dataset={work / 'demos.zarr'}"])
        with open_dict(cfg):
            cfg.run_dir = str(work / args.policy)
        res = train(cfg, progress=False)
        ckpt, train_s = resolve_checkpoint(res["checkpoint"]), res["train_time_s"]

    base = load_config(ckpt)
    fps = float(base.task.fps)
    rows = []
    for delay_ms in (int(x) for x in args.delays_ms.split(",")):
        d = round(delay_ms * fps / 1000)
        for join in JOINS:
            cfg = OmegaConf.merge(base, {"policy": {"n_action_steps": args.chunk},
                                         "eval": {"n_episodes": args.episodes, "chunk_join": join, "delay_steps": d,
                                                  "execute_steps": None if join == "ensemble" else args.execute,
                                                  "temporal_ensemble": 0.01 if join == "ensemble" else None}})
            policy = load_policy(ckpt, cfg, runtime="auto")
            t0 = time.perf_counter()
            s = run_eval(cfg, policy, work / f"eval_{join}_{delay_ms}ms.json", video=False, progress=False)
            rows.append({"delay_ms": delay_ms, "delay_steps": d, "join": join, "success_rate": s["success_rate"],
                         "join_jerk_mean": s["join_jerk_mean"], "jerk_mean": s["jerk_mean"], "n_joins": s["n_joins"],
                         "route_counts": s.get("route_counts", {}), "inference_ms_median": s["inference_ms_median"],
                         "eval_s": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)

    def cell(join: str, delay_ms: int, key: str) -> float:
        return next(r[key] for r in rows if r["join"] == join and r["delay_ms"] == delay_ms)

    delays = sorted({r["delay_ms"] for r in rows})
    worst = delays[-1]
    headline = {
        f"rtc_success_{worst}ms": cell("rtc", worst, "success_rate"),
        f"switch_success_{worst}ms": cell("switch", worst, "success_rate"),
        f"ensemble_success_{worst}ms": cell("ensemble", worst, "success_rate"),
        f"join_jerk_rtc_over_switch_{worst}ms": cell("rtc", worst, "join_jerk_mean") / cell("switch", worst, "join_jerk_mean"),
        f"join_jerk_rtc_over_ensemble_{worst}ms": cell("rtc", worst, "join_jerk_mean") / cell("ensemble", worst, "join_jerk_mean"),
    }
    out = {"task": args.task, "policy": args.policy, "checkpoint": str(ckpt), "fps": fps, "train_steps": args.steps,
           "train_time_s": train_s, "execute_steps": args.execute, "chunk": args.chunk, "eval_episodes": args.episodes,
           "rows": rows, "headline": headline, "wall_time_s": time.perf_counter() - t_start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{args.task} ({fps:g} Hz), {args.policy}, {args.episodes} episodes per cell, chunks of {args.chunk}, "
          f"next chunk due after {args.execute} steps\n")
    print("| delay | join | success | routes up/down | jerk at joins | jerk, all steps | inference ms |\n|---|---|---|---|---|---|---|")
    for r in rows:
        rc = r["route_counts"]
        print(f"| {r['delay_ms']} ms ({r['delay_steps']} steps) | {r['join']} | {r['success_rate']:.2f} | "
              f"{rc.get('up', '-')}/{rc.get('down', '-')} | {r['join_jerk_mean']:.4f} | {r['jerk_mean']:.4f} | "
              f"{r['inference_ms_median']:.1f} |")
    print(" ".join(f"{k}={v:.3f}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
