"""Meta-World multi-task: a small VLM + LoRA (policy=vla) vs multi-task Diffusion Policy, same demos and budget.

    python scripts/experiments/vla_mt10.py --vlm vlm/tiny-smolvlm              # MT10, defaults below
    python scripts/experiments/vla_mt10.py --tasks reach-v3 drawer-close-v3 button-press-topdown-v3 \
        --demos-per-task 10 --steps 500 --episodes-per-task 10              # what fits a shared 2-core CPU

No pretrained VLM weights can be downloaded on this machine: `--vlm` defaults to a tiny random-init
SmolVLM-architecture folder built by scripts/make_tiny_vlm.py, trained through the exact code path
that loads real weights (point `--vlm` at a downloaded SmolVLM folder to run the real comparison).
Both policies see the 39-D state and the task; the VLA reads the task as its instruction string,
Diffusion Policy as a one-hot task id in its observation. Each method trains in its own process
(peak RSS is per method); results go to `<out>/results.json`; the last line is key=value figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's protege, also in the per-method child processes


def run_method(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from omegaconf import open_dict

    from protege.cli import compose
    from protege.envs import make_env
    from protege.evaluation.rollout import evaluate
    from protege.training.trainer import train

    overrides = ["task=metaworld_mt10", f"task.env.task_names=[{','.join(a.tasks)}]", f"task.n_demos={a.demos_per_task * len(a.tasks)}",
                 f"task.dataset={a.out}/demos.zarr", f"train.steps={a.steps}", f"train.batch_size={a.batch_size}",
                 "train.val_every=0", "train.log_every=100000", "train.ema.enabled=false", "eval.n_episodes=0", f"run_dir={a.out}/{a.method}"]
    if a.method == "vla":
        overrides += ["policy=vla", f"policy.pretrained={Path(a.vlm).resolve()}", f"policy.head={a.head}", f"policy.lora_rank={a.lora_rank}"]
    else:
        overrides += ["policy=diffusion"]
    cfg = compose("train", overrides)
    with open_dict(cfg):
        cfg.task.env.max_episode_steps = 150
    result = train(cfg, progress=False)
    train_s = result["train_time_s"]  # the training loop only (not demo collection)
    from protege.training.checkpoint import load_policy

    policy = load_policy(result["checkpoint"])
    n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    per_task, latency = {}, []
    for i, name in enumerate(a.tasks):
        ev = evaluate(policy, lambda j, i=i: make_env("metaworld_mt", task_names=a.tasks, task=i, max_episode_steps=150),
                      n_episodes=a.episodes_per_task, n_envs=min(10, a.episodes_per_task), seed=100_000, progress=False)
        per_task[name] = ev["success_rate"]
        latency.append(ev["inference_ms_median"])
    return {"method": a.method, "per_task_success": per_task, "mean_success": sum(per_task.values()) / len(per_task),
            "trainable_params": n_trainable, "train_s": train_s, "step_ms": 1e3 * train_s / a.steps,
            "inference_ms_median": sorted(latency)[len(latency) // 2],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "checkpoint_mb": (Path(result["checkpoint"]) / "model.safetensors").stat().st_size / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=None, help="Meta-World v3 names (default: MT10)")
    p.add_argument("--demos-per-task", type=int, default=20)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--episodes-per-task", type=int, default=20)
    p.add_argument("--vlm", default=None, help="local VLM folder (default: build a tiny random-init one)")
    p.add_argument("--head", default="l1")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on a shared box)")
    p.add_argument("--out", default="runs/vla_mt10")
    p.add_argument("--method", choices=["vla", "diffusion"], help=argparse.SUPPRESS)  # child process
    a = p.parse_args()
    if a.tasks is None:
        from protege.envs.metaworld_mt import MT10

        a.tasks = list(MT10)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.method:
        (out / f"{a.method}.json").write_text(json.dumps(run_method(a), indent=2))
        return
    if a.vlm is None:
        sys.path.insert(0, str(ROOT / "scripts"))
        from make_tiny_vlm import make_tiny_vlm

        a.vlm = str(make_tiny_vlm(out / "tiny-smolvlm"))
    results = {}
    for method in ("diffusion", "vla"):  # diffusion first: it collects the shared demos
        args = [sys.executable, __file__, "--method", method, "--tasks", *a.tasks, "--demos-per-task", str(a.demos_per_task),
                "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--episodes-per-task", str(a.episodes_per_task),
                "--vlm", a.vlm, "--head", a.head, "--lora-rank", str(a.lora_rank), "--threads", str(a.threads), "--out", str(out)]
        subprocess.run(args, check=True, cwd=ROOT)
        results[method] = json.loads((out / f"{method}.json").read_text())
    results["config"] = {k: v for k, v in vars(a).items() if k != "method"}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for m in ("diffusion", "vla"):
        r = results[m]
        print(f"{m}: " + " ".join(f"{t}={s:.2f}" for t, s in r["per_task_success"].items()))
    d, v = results["diffusion"], results["vla"]
    print(f"vla_success={v['mean_success']:.3f} diffusion_success={d['mean_success']:.3f} "
          f"vla_trainable={v['trainable_params']} diffusion_trainable={d['trainable_params']} "
          f"vla_step_ms={v['step_ms']:.0f} diffusion_step_ms={d['step_ms']:.0f} "
          f"vla_peak_rss_mb={v['peak_rss_mb']:.0f} diffusion_peak_rss_mb={d['peak_rss_mb']:.0f} "
          f"vla_ckpt_mb={v['checkpoint_mb']:.2f} vla_infer_ms={v['inference_ms_median']:.1f} diffusion_infer_ms={d['inference_ms_median']:.1f}")


if __name__ == "__main__":
    main()
