"""Image policies from pixels: ACT and Diffusion Policy from a camera plus joints (no object poses).

Trains each policy on the same scripted demos with the one trainer, evaluates it in the simulator
during training (`--eval-every`, so success can be read against wall time) and at the end, and prints
a markdown table (success, wall time, sizes); the full results go to `<out>/results_<task>.json`.

    # ALOHA transfer-cube from the `top` camera (96x128) + the 14 joint positions; cache the demos once
    protege collect task=aloha_transfer_cube n_episodes=100 out=data/tc100.zarr
    # measured: act_small 0.88 success (50 episodes) in 44.6 min on one CPU thread (README, Image policies)
    python scripts/experiments/visuomotor.py --dataset data/tc100.zarr --policies act_small \\
        --steps 7000 --batch 32 --lr 1e-3 --eval-every 1750 --episodes 50 +task.env.terminate_on_success=true

    # Meta-World from the `corner` camera + the hand (position and gripper only: no object pose). The
    # button's box is plainly visible at 64x64 (reach-v3's goal is a ~1-pixel dot at this size)
    protege collect task=button-press-topdown-v3 +task.env.cameras=[corner] +task.env.image_size=64 \\
        task.env.proprio=true n_episodes=100 out=data/mw_bp.zarr
    python scripts/experiments/visuomotor.py --task metaworld --dataset data/mw_bp.zarr --policies diffusion_image \\
        --steps 3000 --eval-every 1000 task.env.task=button-press-topdown-v3 +task.env.cameras=[corner] \\
        +task.env.image_size=64 task.env.proprio=true

Per-policy settings that differ from the configs' defaults are in PRESETS (CPU-sized choices for these
tasks, stated in the table); anything after the options is a hydra override applied to every run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from protege.cli import compose, configure_rendering
from protege.training.trainer import train

# CPU-sized choices per policy (overridable on the command line); obs keys are set per task below
PRESETS: dict[str, list[str]] = {
    "diffusion_image": ["policy.n_obs_steps=1", "policy.horizon=16", "policy.n_action_steps=8",
                        "policy.down_dims=[64,128,256]", "policy.image.channels=[16,32,32,32]",
                        "policy.image.strides=[2,2,1,1]"],
    "act_small": ["policy.hidden_dim=128", "policy.dim_feedforward=512", "policy.n_encoder_layers=2",
                  "policy.n_vae_encoder_layers=1", "policy.chunk_size=50", "policy.n_action_steps=50",
                  "policy.backbone_channels=[16,32,64,64]", "train.weight_decay=1e-4"],
}
CAMERA_KEYS = {"aloha_transfer_cube": "[obs/state,obs/top]", "aloha_insertion": "[obs/state,obs/top]",
               "metaworld": "[obs/proprio,obs/corner]"}


def eval_curve(run_dir: Path, t_start: float) -> list[dict]:
    """Success of the evaluations run during training, with the wall time (min) at which each finished."""
    curve = []
    for f in sorted(run_dir.glob("eval_step_*.json")) + [run_dir / "eval.json"]:
        if f.exists():
            ev = json.loads(f.read_text())
            step = int(f.stem.split("_")[-1]) if f.stem != "eval" else None
            curve.append({"step": step, "success": ev["success_rate"], "episodes": ev["n_episodes"],
                          "wall_min": round((f.stat().st_mtime - t_start) / 60, 1)})
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="aloha_transfer_cube")
    p.add_argument("--dataset", required=True, help="replay buffer with camera frames (protege collect ...)")
    p.add_argument("--policies", default="diffusion_image,act_small")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes at the end")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (success vs wall time)")
    p.add_argument("--out", default="runs/visuomotor")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    args = p.parse_args()
    configure_rendering()
    rows = []
    for policy_name in args.policies.split(","):
        run_dir = Path(args.out) / f"{args.task}_{policy_name}"
        cfg = compose("train", [
            f"task={args.task}", f"policy={policy_name}", f"dataset={args.dataset}",
            f"task.obs_keys={CAMERA_KEYS.get(args.task, '[obs/state,obs/top]')}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.lr={args.lr}",
            f"train.eval_every={args.eval_every}", f"eval.n_episodes={args.episodes}", "eval.video_episodes=1",
            "train.val_every=0", f"train.ckpt_every={args.eval_every or 1000}", f"run_dir={run_dir}",
            *PRESETS.get(policy_name, []), *args.overrides])
        t0 = time.time()
        result = train(cfg, progress=True)
        wall = time.time() - t0
        from protege.training.checkpoint import load_policy

        policy = load_policy(run_dir)
        meta = cfg.shape_meta
        # plain lists: shape_meta holds omegaconf ListConfigs, which json.dumps refuses
        cams = {k: list(v["shape"]) for k, v in meta.items() if v["kind"] == "image"}
        rows.append({
            "task": args.task if args.task != "metaworld" else cfg.task.name, "policy": policy_name,
            "success": result["eval"]["success_rate"], "episodes": result["eval"]["n_episodes"],
            "max_stage_counts": result["eval"].get("max_stage_counts"),
            "wall_min": wall / 60, "train_min": result["train_time_s"] / 60, "steps": args.steps, "batch": args.batch,
            # the training loop alone (evaluations during training excluded): the compute budget's rate
            "steps_per_s": len(result["step_s"]) / max(sum(result["step_s"]), 1e-9),
            "lr": args.lr, "cameras": cams, "obs_keys": list(cfg.task.obs_keys), "dataset": args.dataset,
            "params_m": sum(p.numel() for p in policy.parameters()) / 1e6,
            "curve": eval_curve(run_dir, t0), "overrides": [*PRESETS.get(policy_name, []), *args.overrides],
            "threads": torch.get_num_threads(), "final_loss": result["losses"][-1]})
        out = Path(args.out) / f"results_{args.task}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))  # after every policy: a cut session keeps what finished
    print("\n| task | policy | obs | success | success vs wall time (min) | wall min | steps x batch | params |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        curve = ", ".join(f"{c['success']:.2f}@{c['wall_min']}" for c in r["curve"])
        obs = " + ".join(f"{k} {'x'.join(map(str, s[:2]))}" if k in r["cameras"] else k for k, s in
                         ((k, r["cameras"].get(k)) for k in r["obs_keys"]))
        print(f"| {r['task']} | {r['policy']} | {obs} | {r['success']:.2f} ({r['episodes']} ep) | {curve} | "
              f"{r['wall_min']:.1f} | {r['steps']}x{r['batch']} | {r['params_m']:.2f} M |")
    print(" ".join(f"{r['policy']}_success={r['success']:.2f} {r['policy']}_wall_min={r['wall_min']:.1f}" for r in rows))


if __name__ == "__main__":
    main()
