"""robomimic's own BC-RNN side by side with our Diffusion Policy and BC, on the same scripted demos.

1. Collects `--demos` scripted-expert demos once (`<work>/<task>/demos.zarr`) and exports them to a
   robomimic hdf5 (`demos.hdf5`) with our exporter.
2. BC-RNN: robomimic's low-dim "ph" BC-RNN config, built by robomimic's own paper-config generator
   (`robomimic/scripts/generate_paper_configs.py`: low-dim defaults + the task's dataset settings + the
   BC-RNN hyper-parameters), trained by robomimic's `train` entry point in a subprocess and evaluated
   by its own rollout code (`rollout_with_stats`, run once after the last epoch). Adjusted, and only
   these: data path, output dir, epochs, rollout count (rollouts once, after the last epoch), seed,
   and no validation split (our demos have no train/valid masks; every method trains on all demos).
   `--no-gmm` (a declared deviation from robomimic's "ph" BC-RNN config, named in the table row and
   written to `bc_rnn_nogmm.json`): `config.algo.gmm.enabled=False`, i.e. a deterministic action head
   trained with robomimic's default L2 loss instead of the 5-mode GMM's negative log-likelihood. On
   our scripted demos the GMM collapses onto the near-deterministic actions (NLL keeps falling, gradient
   norms explode, 0 % success); robomimic's own paper-config generator turns the GMM off for its
   machine-generated ("mg") datasets for the same kind of data, and for low-dim BC-RNN that is the only
   setting in which its "mg" config differs from "ph" (validation is off here in both cases).
3. Our `policy=diffusion` and `policy=bc` with the one trainer on the same demos (no held-out
   episodes either), evaluated with the same episode horizon as robomimic's rollouts.

Each method writes `<work>/<task>/<method>.json`; the table is printed from every result present, so
methods can run in separate processes (e.g. one per CPU slot):

    python scripts/experiments/robomimic_peer.py --methods bc_rnn --epochs 100
    python scripts/experiments/robomimic_peer.py --methods bc_rnn --epochs 30 --no-gmm
    python scripts/experiments/robomimic_peer.py --methods dp,bc --dp-steps 1500 --bc-steps 1500
    python scripts/experiments/robomimic_peer.py --methods none       # only print the table

Wall time and samples/s are of the training loop only (robomimic: the sum of its per-epoch `Time_Epoch`,
which includes its data loading; ours: the trainer's `train_time_s`), not of set-up or rollouts. A
"sample" is one training example: a 10-step sequence for BC-RNN, one window (2 observations, a
16-step action chunk) for ours.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# robomimic's dataset registry names and the rollout horizon its configs use for these tasks
ROBOMIMIC_TASK = {"robomimic_lift": "lift", "robomimic_can": "can"}
METHODS = ("bc_rnn", "dp", "bc")
# result files (<work>/<task>/<key>.json) in table order: bc_rnn_nogmm is bc_rnn run with --no-gmm
RESULTS = ("bc_rnn", "bc_rnn_nogmm", "dp", "bc")
LABEL = {"bc_rnn": "robomimic BC-RNN", "bc_rnn_nogmm": "robomimic BC-RNN, GMM off (`algo.gmm.enabled=False`, deviation)",
         "dp": "protege Diffusion Policy", "bc": "protege BC (MLP)"}


class RobomimicRunError(RuntimeError):
    """robomimic's train() failed or its log lacks the figures this script reads."""


def bc_rnn_config(task: str, dataset: str | Path, output_dir: str | Path, epochs: int, rollouts: int,
                  seed: int = 1, name: str = "bc_rnn", gmm: bool = True) -> Any:
    """robomimic's BC-RNN config for a low-dim "ph" dataset, as its paper-config generator builds it,
    adjusted only in data path, output dir, epochs, rollouts, seed and validation (see module doc).
    `gmm=False` is the one declared deviation (`--no-gmm`): a deterministic head with the L2 loss."""
    from robomimic.config import config_factory
    from robomimic.scripts import generate_paper_configs as paper

    if task not in ROBOMIMIC_TASK:
        raise ValueError(f"task {task!r}: robomimic BC-RNN side by side supports {sorted(ROBOMIMIC_TASK)}")
    if epochs < 1 or rollouts < 1:
        raise ValueError(f"epochs and rollouts must be >= 1, got epochs={epochs} rollouts={rollouts}")
    rm_task = ROBOMIMIC_TASK[task]
    config = config_factory("bc")  # BC-RNN is robomimic's "bc" algo with algo.rnn.enabled
    config = paper.modify_config_for_default_low_dim_exp(config)
    # sets the rollout horizon from robomimic's registry; its dataset path is replaced below
    config = paper.modify_config_for_dataset(config, task_name=rm_task, dataset_type="ph", hdf5_type="low_dim",
                                             base_dataset_dir=str(Path(dataset).parent))
    config = paper.modify_bc_rnn_config_for_dataset(config, task_name=rm_task, dataset_type="ph", hdf5_type="low_dim")
    with config.values_unlocked():
        config.experiment.name = name
        config.train.data = str(dataset)
        config.train.output_dir = str(output_dir)
        config.train.num_epochs = epochs
        config.train.seed = seed
        # no train/valid masks in our demos, and all methods train on every demo
        config.experiment.validate = False
        # the paper config reads mask/train and mask/valid when validating; without a split: every demo
        config.train.hdf5_filter_key = None
        config.train.hdf5_validation_filter_key = None
        config.experiment.rollout.n = rollouts
        config.experiment.rollout.rate = epochs  # one evaluation, after the last epoch
    if not gmm:
        # deviation from the "ph" config (see module doc): robomimic's algo factory then builds BC_RNN
        # (RNNActorNetwork, loss = algo.loss.l2_weight 1.0 x MSE) instead of BC_RNN_GMM
        with config.algo.values_unlocked():
            config.algo.gmm.enabled = False
    return config


_EPOCH = re.compile(r"Train Epoch (\d+)\s*\n(\{.*?\n\})", re.S)
_ROLLOUT = re.compile(r"Epoch (\d+) Rollouts took \S+s \(avg\) with results:\s*\nEnv: (\S+)\s*\n(\{.*?\n\})", re.S)


def parse_robomimic_log(text: str) -> dict[str, Any]:
    """Per-epoch training stats and rollout results from the stdout of robomimic's train script.

    robomimic's main() catches every exception, prints it and exits 0, so a failed run is detected
    here from its last words, not from the exit code."""
    if "run failed with error" in text:
        raise RobomimicRunError("robomimic training failed:\n" + text[text.index("run failed with error"):][-4000:])
    epochs = {int(m[1]): json.loads(m[2]) for m in _EPOCH.finditer(text)}
    rollouts = [{"epoch": int(m[1]), "env": m[2], **json.loads(m[3])} for m in _ROLLOUT.finditer(text)]
    if not epochs:
        raise RobomimicRunError("no 'Train Epoch' blocks in robomimic's output (did it start training?)")
    if "finished run successfully!" not in text:
        raise RobomimicRunError(f"robomimic's output ends without 'finished run successfully!' after epoch {max(epochs)}")
    return {"epochs": epochs, "rollouts": rollouts}


def summarize_bc_rnn(log: dict[str, Any], config: Any) -> dict[str, Any]:
    """Table figures from a parsed robomimic log and the config it ran."""
    epochs = log["epochs"]
    if not log["rollouts"]:
        raise RobomimicRunError("robomimic ran no rollouts (experiment.rollout.enabled / rate?)")
    last = log["rollouts"][-1]
    steps_per_epoch = config.experiment.epoch_every_n_steps
    steps = len(epochs) * steps_per_epoch
    train_s = 60.0 * sum(e["Time_Epoch"] for e in epochs.values())  # robomimic logs minutes
    return {"steps": steps, "batch_size": config.train.batch_size, "epochs": len(epochs),
            "train_time_s": train_s, "samples_per_s": steps * config.train.batch_size / train_s,
            "success_rate": float(last["Success_Rate"]), "n_episodes": config.experiment.rollout.n,
            "horizon": config.experiment.rollout.horizon, "mean_length": float(last["Horizon"]),
            "eval_wall_s": 60.0 * float(last["Time_Episode"]), "final_loss": float(epochs[max(epochs)]["Loss"])}


def _robomimic_train_entry(config_path: str) -> None:
    """Runs robomimic's train script in this (child) process with two environment shims:
    - the mujoco_py stand-in protege uses (robomimic 0.3.0 imports mujoco_py only to name an exception);
    - torch.set_num_threads capped at OMP_NUM_THREADS: robomimic's train() hard-codes 2 threads, which
      on a shared 2-core machine (one slot per job, OMP_NUM_THREADS=1) would oversubscribe the cores."""
    import runpy

    # triton (reached through torchvision.ops, which robomimic imports) must load before mujoco: with
    # MUJOCO_GL=osmesa the reverse order segfaults here (triton's and OSMesa's LLVMs in one process)
    import torchvision.ops  # noqa: F401

    from protege.envs.robomimic import _env_utils

    _env_utils()
    import torch

    cap = int(os.environ.get("OMP_NUM_THREADS") or 0)
    if cap > 0:
        set_threads = torch.set_num_threads
        torch.set_num_threads = lambda n: set_threads(min(int(n), cap))
    sys.argv = ["robomimic/scripts/train.py", "--config", config_path]
    runpy.run_module("robomimic.scripts.train", run_name="__main__")


def run_bc_rnn(args: argparse.Namespace, work: Path, hdf5: Path, n_demos: int) -> dict[str, Any]:
    key = "bc_rnn_nogmm" if args.no_gmm else "bc_rnn"
    out_dir = work / key
    out_dir.mkdir(parents=True, exist_ok=True)
    config = bc_rnn_config(args.task, hdf5, out_dir / "trained_models", args.epochs, args.episodes, seed=args.seed + 1,
                           name=f"{key}_{time.strftime('%Y%m%d_%H%M%S')}", gmm=not args.no_gmm)
    config_path = out_dir / "config.json"
    config.dump(filename=str(config_path))
    log_path = out_dir / "stdout.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--robomimic-train", str(config_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    wall = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RobomimicRunError(f"robomimic's train exited {proc.returncode}; last output ({log_path}):\n{text[-3000:]}")
    res = summarize_bc_rnn(parse_robomimic_log(text), config)
    return {"method": key, "demos": n_demos, "gmm": bool(config.algo.gmm.enabled), **res, "process_wall_s": wall, "config": str(config_path),
            "log": str(log_path)}


def run_ours(args: argparse.Namespace, work: Path, demos: Path, n_demos: int, method: str) -> dict[str, Any]:
    from omegaconf import open_dict

    from protege.cli import compose
    from protege.training.trainer import train

    policy, steps = {"dp": ("diffusion", args.dp_steps), "bc": ("bc", args.bc_steps)}[method]
    horizon = bc_rnn_config(args.task, "unused.hdf5", "unused", 1, 1).experiment.rollout.horizon
    cfg = compose("train", [f"task={args.task}", f"policy={policy}", f"train.steps={steps}",
                            f"train.batch_size={args.batch_size}", "train.val_ratio=0", f"eval.n_episodes={args.episodes}",
                            f"eval.max_episode_steps={horizon}", "eval.video=false", f"dataset={demos}",
                            f"seed={args.seed}"])
    with open_dict(cfg):
        cfg.run_dir = str(work / method)
    t0 = time.perf_counter()
    result = train(cfg, progress=False)
    wall = time.perf_counter() - t0
    ev = result["eval"]
    return {"method": method, "demos": n_demos, "steps": steps, "batch_size": args.batch_size,
            "train_time_s": result["train_time_s"], "samples_per_s": steps * args.batch_size / result["train_time_s"],
            "success_rate": ev["success_rate"], "n_episodes": ev["n_episodes"], "horizon": horizon,
            "mean_length": ev["mean_length"], "eval_wall_s": ev["wall_time_s"], "final_loss": result["losses"][-1],
            "process_wall_s": wall, "run_dir": result["run_dir"]}


def prepare_demos(args: argparse.Namespace, work: Path) -> tuple[Path, Path, int]:
    """Scripted demos (collect resumes an existing buffer) and their robomimic hdf5 export."""
    from omegaconf import OmegaConf

    from protege.cli import compose
    from protege.datasets.adapters.robomimic import export
    from protege.envs.collect import collect

    demos, hdf5 = work / "demos.zarr", work / "demos.hdf5"
    task = compose("train", [f"task={args.task}", f"dataset={demos}"]).task
    buf = collect(task.env_id, OmegaConf.to_container(task.env, resolve=True), args.demos, demos,
                  fps=task.fps, seed=task.demo_seed, progress=False)
    if buf.n_episodes != args.demos:
        raise RuntimeError(f"{demos} holds {buf.n_episodes} demos, --demos {args.demos}: use another --work")
    if not hdf5.exists():
        export(buf, hdf5, progress=False)
    return demos, hdf5, buf.n_episodes


def table(work: Path, task: str) -> list[str]:
    rows = ["| task | method | demos | train steps × batch | success | episodes (horizon) | train wall s | samples/s |",
            "|---|---|---|---|---|---|---|---|"]
    for m in RESULTS:
        f = work / f"{m}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        steps = f"{r['steps']} × {r['batch_size']}" + (f" ({r['epochs']} epochs)" if "epochs" in r else "")
        rows.append(f"| {task} | {LABEL[m]} | {r['demos']} | {steps} | **{r['success_rate']:.2f}** "
                    f"({round(r['success_rate'] * r['n_episodes'])}/{r['n_episodes']}) | {r['n_episodes']} ({r['horizon']}) "
                    f"| {r['train_time_s']:.0f} | {r['samples_per_s']:.0f} |")
    return rows


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--robomimic-train":  # the child process of run_bc_rnn
        _robomimic_train_entry(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="robomimic_lift", choices=sorted(ROBOMIMIC_TASK))
    p.add_argument("--methods", default="bc_rnn,dp,bc", help=f"comma list of {','.join(METHODS)}, or none")
    p.add_argument("--demos", type=int, default=50)
    p.add_argument("--epochs", type=int, default=100, help="robomimic epochs (100 gradient steps × batch 100 each)")
    p.add_argument("--no-gmm", action="store_true",
                   help="bc_rnn with algo.gmm.enabled=False (a deviation from robomimic's ph config; "
                        "results in bc_rnn_nogmm.json, its own table row)")
    p.add_argument("--dp-steps", type=int, default=1500)
    p.add_argument("--bc-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128, help="ours (robomimic keeps its own 100)")
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/exp_robomimic_peer")
    args = p.parse_args()
    methods = [] if args.methods == "none" else args.methods.split(",")
    if bad := set(methods) - set(METHODS):
        p.error(f"unknown method(s) {sorted(bad)}; choose from {', '.join(METHODS)} or none")
    if args.no_gmm and "bc_rnn" not in methods:
        p.error("--no-gmm changes only the bc_rnn method: add bc_rnn to --methods")
    work = Path(args.work) / args.task
    work.mkdir(parents=True, exist_ok=True)
    if methods:
        demos, hdf5, n = prepare_demos(args, work)
        failed = []
        for m in methods:
            try:
                res = run_bc_rnn(args, work, hdf5, n) if m == "bc_rnn" else run_ours(args, work, demos, n, m)
            except RobomimicRunError as e:  # the other methods still run; the exit status reports it
                print(f"{m} failed: {e}", file=sys.stderr)
                failed.append(m)
                continue
            (work / f"{res['method']}.json").write_text(json.dumps({"task": args.task, **res}, indent=2))
    print("\n".join(table(work, args.task)))
    figures = [f"{m}_success={json.loads((work / f'{m}.json').read_text())['success_rate']:.3f}" for m in RESULTS
               if (work / f"{m}.json").exists()]
    print(f"task={args.task} " + " ".join(figures))
    if methods and failed:
        sys.exit(f"failed: {', '.join(failed)} (see above)")


if __name__ == "__main__":
    main()
