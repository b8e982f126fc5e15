"""Diffusion Policy (state) on robomimic Lift / Can from scripted-expert demos, evaluated in robosuite.

For each task: collects `--demos` successful scripted demos (robomimic keys + env_args; the expert's
success rate over every seed it tried is reported), trains `policy=diffusion` on robomimic's default
low-dim keys with the one trainer, and evaluates `--episodes` episodes (seeds 100000+) with the env's
own success check. One task per process, so two tasks can run side by side on a 2-core machine:

    python scripts/experiments/robomimic_dp.py --task robomimic_lift --steps 3000
    python scripts/experiments/robomimic_dp.py --task robomimic_can --demos 61 --steps 20000 --episodes 50  # 0.86 measured
Prints a markdown table row and a last line of key=value figures; writes <work>/<task>/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from protege.cli import compose
from protege.envs.collect import collect
from protege.training.trainer import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="robomimic_lift", choices=["robomimic_lift", "robomimic_can"])
    p.add_argument("--demos", type=int, default=100)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/exp_robomimic_dp")
    args = p.parse_args()
    work = Path(args.work) / args.task
    demos = work / "demos.zarr"
    cfg = compose("train", [f"task={args.task}", "policy=diffusion", f"train.steps={args.steps}",
                            f"train.batch_size={args.batch_size}", f"eval.n_episodes={args.episodes}",
                            "eval.video=false", f"dataset={demos}", f"seed={args.seed}"])
    with open_dict(cfg):
        cfg.run_dir = str(work / "dp")

    t0 = time.perf_counter()
    buf = collect(cfg.task.env_id, OmegaConf.to_container(cfg.task.env, resolve=True), args.demos, demos,
                  fps=cfg.task.fps, seed=cfg.task.demo_seed, progress=False)
    collect_s = time.perf_counter() - t0
    tried = int(buf.attrs["collect"]["next_seed"]) - int(cfg.task.demo_seed)  # every seed the expert ran
    expert = {"successes": buf.n_episodes, "seeds_tried": tried, "success_rate": buf.n_episodes / tried,
              "mean_demo_length": buf.n_steps / buf.n_episodes}

    result = train(cfg, progress=False)
    ev = result["eval"]
    out = {"task": args.task, "demos": buf.n_episodes, "steps": args.steps, "batch_size": args.batch_size,
           "expert": expert, "collect_s": collect_s, "train_time_s": result["train_time_s"],
           "success_rate": ev["success_rate"], "n_episodes": ev["n_episodes"], "mean_length": ev["mean_length"],
           "eval_wall_s": ev["wall_time_s"], "run_dir": result["run_dir"]}
    (work / "results.json").write_text(json.dumps(out, indent=2))
    print(f"| {args.task} | {buf.n_episodes} | {expert['successes']}/{tried} | {args.steps} | "
          f"{result['train_time_s'] / 60:.1f} min | **{ev['success_rate']:.2f}** ({round(ev['success_rate'] * ev['n_episodes'])}"
          f"/{ev['n_episodes']}) |")
    print(f"task={args.task} success_rate={ev['success_rate']:.3f} n_episodes={ev['n_episodes']} "
          f"expert_success={expert['success_rate']:.3f} expert_seeds={tried} train_s={result['train_time_s']:.0f}")


if __name__ == "__main__":
    main()
