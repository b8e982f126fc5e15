"""ACT (and ACT-JEPA) on the bimanual ALOHA-style tasks: success vs chunk size and temporal ensembling,
same data and budget.

Trains each policy x chunk size with the one trainer, then evaluates the same checkpoint with plain chunk
execution and with temporal ensembling, and measures the held-out chunk prediction error (L1 of the
z = 0 prediction against the demonstrated chunk, in normalised action units, on the validation episodes).
Prints a markdown table and writes the full results as JSON.

    python scripts/experiments/act_aloha.py --dataset data/tc20.zarr --obs state --policies act_small,act_jepa_small --chunks 100

    python scripts/experiments/act_aloha.py --dataset data/tc50.zarr --steps 3000 --obs image
    python scripts/experiments/act_aloha.py --task aloha_insertion --dataset data/ins50.zarr ...

`--obs state` uses joints + object poses (obs/state, obs/env_state): no cameras, fast, isolates the
chunking question. `--obs image` is ACT's setting (joints + the top camera). Scale it up on a GPU with
`--policy act --lr 1e-5 --batch 8 --steps 100000` (the paper's; ~5 h on one GPU in the ACT paper).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import open_dict

from protege.cli import compose, configure_rendering
from protege.datasets.replay_buffer import ReplayBuffer
from protege.datasets.sampler import SequenceSampler, split_episodes, to_torch
from protege.policies.base import Policy
from protege.training.checkpoint import load_policy
from protege.training.trainer import run_eval, train


@torch.no_grad()
def heldout_chunk_l1(policy: Policy, cfg, max_windows: int = 2048) -> float:
    """Mean |predicted - demonstrated| over the unpadded steps of validation-episode windows (normalised)."""
    buffer = ReplayBuffer.load(cfg.dataset_resolved, keys=[*cfg.task.obs_keys, "action"])
    _, val_eps = split_episodes(buffer.n_episodes, cfg.train.val_ratio, cfg.seed)
    sampler = SequenceSampler(buffer, list(cfg.task.obs_keys), 1, policy.horizon, episodes=val_eps)
    idx = np.random.default_rng(0).permutation(len(sampler))[:max_windows]
    policy.eval()
    errs, counts = 0.0, 0
    for chunk in np.array_split(idx, max(1, len(idx) // 256)):
        batch = to_torch(sampler.gather(chunk))
        pred = policy.normalizer.normalize(policy.action_key, policy.predict_action({k: batch[k] for k in policy.obs_keys}))
        true = policy.normalizer.normalize(policy.action_key, batch[policy.action_key].float())[:, : pred.shape[1]]
        valid = ~batch["action_is_pad"][:, : pred.shape[1], None]
        errs += float(((pred - true).abs() * valid).sum())
        counts += int(valid.sum()) * pred.shape[-1]
    return errs / max(counts, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="aloha_transfer_cube")
    p.add_argument("--dataset", required=True, help="replay buffer of scripted demos (protege collect ...)")
    p.add_argument("--obs", choices=["state", "image"], default="image")
    p.add_argument("--policies", default="act_small", help="policy configs to compare, comma-separated (e.g. act_small,act_jepa_small)")
    p.add_argument("--val-ratio", type=float, default=0.1, help="episodes held out for the chunk prediction error")
    p.add_argument("--chunks", default="100,1", help="chunk sizes to train, comma-separated")
    p.add_argument("--m", type=float, default=0.01, help="temporal ensembling coefficient (ACT: 0.01)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--out", default="runs/act_aloha")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for every variant")
    args = p.parse_args()
    configure_rendering()
    obs_keys = "[obs/state,obs/top]" if args.obs == "image" else "[obs/state,obs/env_state]"
    rows = []
    variants = [(pol, int(c)) for pol in args.policies.split(",") for c in args.chunks.split(",")]
    for policy_name, chunk in variants:
        run_dir = Path(args.out) / f"{args.obs}_{policy_name}_chunk{chunk}"
        cfg = compose("train", [
            f"task={args.task}", f"policy={policy_name}", f"train.val_ratio={args.val_ratio}", f"dataset={args.dataset}", f"task.obs_keys={obs_keys}",
            f"policy.chunk_size={chunk}", f"policy.n_action_steps={chunk}", f"train.steps={args.steps}",
            f"train.batch_size={args.batch}", f"train.lr={args.lr}", "train.weight_decay=1e-4", "train.ema.enabled=false",
            f"eval.n_episodes={args.episodes}", "eval.temporal_ensemble=null", "eval.video_episodes=1", f"run_dir={run_dir}",
            "train.val_every=0", "train.ckpt_every=1000", *([] if args.obs == "image" else ["task.env.cameras=[]"]),
            *args.overrides])
        t0 = time.perf_counter()
        result = train(cfg, progress=True)
        train_s = time.perf_counter() - t0 - result["eval"]["wall_time_s"]
        val_l1 = heldout_chunk_l1(load_policy(run_dir), cfg)
        evals = {"chunks": result["eval"]}
        if chunk > 1:  # temporal ensembling of the same checkpoint (chunk 1 has nothing to ensemble)
            with open_dict(cfg):
                cfg.eval.temporal_ensemble = args.m
            evals[f"ensemble m={args.m}"] = run_eval(cfg, load_policy(run_dir), run_dir / "eval_te.json", video=False)
        for mode, ev in evals.items():
            rows.append({"task": args.task, "obs": args.obs, "policy": policy_name, "chunk": chunk, "execution": mode,
                         "heldout_chunk_l1": val_l1, "dataset": args.dataset,
                         "success": ev["success_rate"], "episodes": ev["n_episodes"],
                         "max_stage_counts": ev.get("max_stage_counts"), "train_min": train_s / 60,
                         "steps": args.steps, "batch": args.batch, "inference_ms": ev["inference_ms_median"],
                         "final_loss": result["losses"][-1]})
    out = Path(args.out) / f"results_{args.task}_{args.obs}.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"\n| task | obs | policy | chunk | execution | success | held-out chunk L1 | stages reached | train min | steps x batch | inference ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['obs']} | {r['policy']} | {r['chunk']} | {r['execution']} | {r['success']:.2f} ({r['episodes']} ep) | "
              f"{r['heldout_chunk_l1']:.4f} | "
              f"{r['max_stage_counts']} | {r['train_min']:.1f} | {r['steps']}x{r['batch']} | {r['inference_ms']:.1f} |")


if __name__ == "__main__":
    main()
