"""One training loop for every policy: data -> policy.compute_loss -> AdamW -> EMA -> checkpoints -> eval.

Reads a hydra config (`protege/configs/train.yaml`). Everything that makes the next loss differ is
saved in `train_state.pt` (online weights, optimizer, LR scheduler, EMA, torch RNG and the sampler's
position in the window stream), so `resume=true` continues a run bit-for-bit on CPU. Validation and evaluation run
inside `torch.random.fork_rng` so they never perturb the training stream.

Data (`protege/datasets/loader.py`): one stream of window indices, a function of (seed, position);
batches from an in-memory copy of the buffer when it fits `train.data.memory_budget_gb`, else read
from the store by DataLoader workers.

Multi-GPU / multi-node: launched with `torchrun ... -m protege.cli train ...` every rank trains on
disjoint windows of the same stream with DistributedDataParallel (NCCL on CUDA, gloo on CPU);
rank 0 logs, checkpoints and evaluates.

Preemption: SIGINT/SIGTERM finish the current step, write a checkpoint (every rank agrees on the
step) and return `interrupted`; `protege train` prints the resume command.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from protege.datasets.loader import WindowIndexStream, batch_iterator, load_buffer
from protege.datasets.replay_buffer import ReplayBuffer
from protege.datasets.sampler import SequenceSampler, split_episodes, to_torch
from protege.errors import ConfigError
from protege.policies.base import Policy, build_policy, shape_meta_from_buffer
from protege.training import checkpoint as ckpt
from protege.training.ema import LerpEMA
from protege.training.preemption import StopSignal, agree_on_stop


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def ema_weights(policy: Policy, ema: EMAModel | None, params: list[torch.nn.Parameter]) -> Iterator[Policy]:
    """The policy with its EMA weights swapped into `params` (the trainable ones) for saving or evaluating,
    the online weights restored after. No copy of the policy: a frozen backbone (a VLM's billions of
    parameters) is never duplicated; only the trainable weights are stored aside meanwhile."""
    if ema is None:
        yield policy
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield policy
    finally:
        ema.restore(params)


def cpu_has_native_bf16() -> bool:
    """The CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16 in Linux's /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """'auto' = bf16 on CUDA when supported, fp16 on older CUDA GPUs, bf16 on CPUs with native bf16
    (AVX512-BF16/AMX: ACT steps 1.7x faster, held-out loss within the fp32 seed-to-seed spread, see
    scripts/experiments/amp_cpu.py), else off; or force 'bf16'/'fp16'/'none'."""
    if setting == "none":
        return None
    if setting == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else None
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def fused_adamw(device: torch.device) -> dict[str, bool]:
    """AdamW keyword for `device`: fused (one kernel over all tensors) where torch has it. The same
    update as the default per-tensor loop, which on CPU runs ~6 ops per tensor: 136 -> 24 ms per step
    for Diffusion Policy's 17M-parameter U-Net (LeRobot keeps the loop)."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def dataset_path(cfg: DictConfig) -> Path | str:
    """A local path, or an fsspec URL kept as a string (Path would turn 'memory://x' into 'memory:/x')."""
    if not (cfg.dataset or cfg.task.dataset):
        raise ConfigError(f"task {cfg.task.name} has no default dataset; pass dataset=<replay buffer>")
    name = str(cfg.dataset or cfg.task.dataset)
    return name if "://" in name else Path(name)


def ensure_dataset(cfg: DictConfig, progress: bool = True) -> Path | str:
    """The training buffer; collected with the task's scripted expert if it does not exist yet."""
    path = dataset_path(cfg)
    if isinstance(path, str):  # a URL: used as it is
        return path
    existing = ReplayBuffer.open(path).n_episodes if path.exists() else 0
    if existing < cfg.task.n_demos and not cfg.dataset:
        from protege.envs.collect import collect

        collect(cfg.task.env_id, OmegaConf.to_container(cfg.task.env, resolve=True), cfg.task.n_demos, path,
                fps=cfg.task.fps, seed=cfg.task.demo_seed, progress=progress)
    return path


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def train(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Train `cfg.policy` on `cfg.task`; returns {"run_dir", "checkpoint", "losses", "eval"}."""
    rank, world = _dist_info()
    own_group = world > 1 and not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # SIGINT/SIGTERM handlers from here on; installed before the DataLoader starts its workers (forked
    # ones inherit them; forkserver/spawn ones ignore both signals: loader._ignore_stop_signals)
    stop = StopSignal()
    try:
        return _train(cfg, progress, rank, world, stop)
    finally:
        stop.restore()
        if own_group:
            torch.distributed.destroy_process_group()


def _train(cfg: DictConfig, progress: bool, rank: int, world: int, stop: StopSignal) -> dict[str, Any]:
    device = select_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    is_main = rank == 0
    torch.manual_seed(cfg.seed + rank)
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    resume_dir = ckpt.resolve_checkpoint(run_dir) if cfg.resume and (ckpt_root / "latest").exists() else None
    if cfg.resume and resume_dir is None and is_main:
        print(f"resume: no checkpoint under {run_dir}, starting from scratch")

    # ---- data
    path = ensure_dataset(cfg, progress and is_main) if is_main else dataset_path(cfg)
    if world > 1:
        torch.distributed.barrier()  # rank 0 may have just collected the demos
    obs_keys = list(cfg.task.obs_keys)
    dcfg = cfg.train.data
    buffer, in_memory = load_buffer(path, [*obs_keys, "action"], dcfg.in_memory, dcfg.memory_budget_gb)
    train_eps, val_eps = split_episodes(buffer.n_episodes, cfg.train.val_ratio, cfg.seed)
    if len(train_eps) == 0:
        raise ConfigError(f"{path}: no training episodes (buffer holds {buffer.n_episodes})")
    shape_meta = shape_meta_from_buffer(buffer, obs_keys)
    with open_dict(cfg):
        cfg.shape_meta = shape_meta
        cfg.dataset_resolved = str(path)

    # ---- policy (normalizer fitted on the training episodes only)
    policy = build_policy(cfg.policy, shape_meta)
    step_mask = np.isin(np.repeat(np.arange(buffer.n_episodes), buffer.episode_lengths), train_eps)
    policy.normalizer.fit({k: buffer.data[k][step_mask] for k, st in policy.normalizer.stats.items() if st.mode != "identity"})
    policy.to(device)
    sampler, val_sampler = (SequenceSampler(buffer, obs_keys, policy.n_obs_steps, policy.horizon, episodes=eps,
                                            horizon_obs_keys=policy.horizon_obs_keys) if len(eps) else None
                            for eps in (train_eps, val_eps))

    tcfg = cfg.train
    optimizer = torch.optim.AdamW(policy.optim_groups(tcfg.lr), lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay,
                                  **fused_adamw(device))
    lr_scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=tcfg.steps)
    # EMA over trainable parameters only: a frozen (e.g. pretrained VLM) backbone is not copied
    trainable = [p for p in policy.parameters() if p.requires_grad]
    ema = LerpEMA(trainable, decay=tcfg.ema.max_decay, use_ema_warmup=True, power=tcfg.ema.power) if tcfg.ema.enabled else None
    dtype = amp_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    step, position = 0, 0  # position: windows consumed by all ranks (the index stream's state)
    if resume_dir is not None:
        state = ckpt.load_train_state(resume_dir)
        policy.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        per_rank = state["rng"].get("torch_ranks") or [state["rng"]["torch"]]
        if rank < len(per_rank):  # a rank added on resume keeps its fresh seed
            torch.set_rng_state(per_rank[rank])
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step = int(state["step"])
        position = int(state.get("windows", step * tcfg.batch_size * world))
        if is_main:
            print(f"resumed from {resume_dir} at step {step}")

    model: torch.nn.Module = policy
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        writer = SummaryWriter(str(run_dir / "tb"))

    def deployable() -> contextlib.AbstractContextManager[Policy]:
        return ema_weights(policy, ema, trainable)

    def save(at_step: int, torch_states: list[torch.Tensor]) -> Path:
        train_state = {
            "step": at_step,
            "windows": position,
            "model": {k: v.clone() for k, v in policy.state_dict().items()},  # online weights: the EMA swaps in below
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else {},
            "rng": {"torch": torch_states[0], "torch_ranks": torch_states,
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        with deployable() as deploy:
            return ckpt.save_checkpoint(ckpt_root, at_step, deploy, cfg, train_state, keep=tcfg.keep_checkpoints)

    stream = WindowIndexStream(len(sampler), tcfg.batch_size, cfg.seed, rank, world, position)
    batches = batch_iterator(sampler, stream, streaming=not in_memory, num_workers=dcfg.num_workers,
                             prefetch_factor=dcfg.prefetch_factor, pin_memory=device.type == "cuda",
                             worker_start=dcfg.worker_start)
    if is_main and not in_memory:
        print(f"streaming windows from {path} ({dcfg.num_workers} workers): the decoded buffer exceeds "
              f"train.data.memory_budget_gb={dcfg.memory_budget_gb}" if dcfg.in_memory == "auto" else
              f"streaming windows from {path} ({dcfg.num_workers} workers)")
    losses: list[float] = []
    last_ckpt: Path | None = resume_dir
    bar = tqdm(total=tcfg.steps, initial=step, desc="train", unit="step", disable=not (progress and is_main), dynamic_ncols=True)
    t0, t_log = time.perf_counter(), time.perf_counter()
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    stop_at = min(tcfg.steps, tcfg.stop_at or tcfg.steps)  # stop_at: end early (as if preempted); resume later
    interrupted = 0
    wait_s: list[float] = []  # per step: time blocked on the data (the rest of step_s is compute)
    step_s: list[float] = []
    while step < stop_at and not interrupted:
        policy.train()
        t_step = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        wait_s.append(time.perf_counter() - t_step)
        with autocast():
            out = model(batch)
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), tcfg.grad_clip) if tcfg.grad_clip else None
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        policy.on_train_step()
        if ema is not None:
            ema.step(trainable)
        step += 1
        position += stream.global_batch
        interrupted = agree_on_stop(stop.signum, world, device)
        loss_value = loss.item()  # also waits for the device: step_s covers the whole step
        step_s.append(time.perf_counter() - t_step)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; lower train.lr or check the data")
        losses.append(loss_value)
        bar.update(1)
        save_due = (tcfg.ckpt_every and step % tcfg.ckpt_every == 0) or step == stop_at or interrupted
        torch_states = _gather_rng_states(world) if save_due else None  # collective: every rank joins
        if not is_main:
            continue
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            bar.set_postfix(loss=f"{loss_value:.4f}")
            now = time.perf_counter()
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/lr", lr_scheduler.get_last_lr()[0], step)
            writer.add_scalar("train/steps_per_s", tcfg.log_every / max(now - t_log, 1e-9), step)
            recent = slice(-tcfg.log_every, None)
            writer.add_scalar("train/data_wait_frac", sum(wait_s[recent]) / max(sum(step_s[recent]), 1e-9), step)
            if grad_norm is not None:
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
            for k, v in out.items():
                if k != "loss":
                    writer.add_scalar(f"train/{k}", float(v), step)
            t_log = now
        if val_sampler is not None and tcfg.val_every and step % tcfg.val_every == 0:
            writer.add_scalar("val/loss", validation_loss(policy, val_sampler, tcfg.batch_size, device, cfg.seed), step)
        if save_due:
            last_ckpt = save(step, torch_states)
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
            with deployable() as deploy:
                summary = run_eval(cfg, deploy, run_dir / f"eval_step_{step:08d}.json", video=False, progress=False)
            writer.add_scalar("eval/success_rate", summary["success_rate"], step)
    bar.close()
    result: dict[str, Any] = {"run_dir": str(run_dir), "checkpoint": str(last_ckpt) if last_ckpt else None, "losses": losses,
                              "train_time_s": time.perf_counter() - t0, "step": step, "interrupted": interrupted,
                              "policy": policy, "data_wait_s": wait_s, "step_s": step_s}
    if world > 1:
        torch.distributed.barrier()
    if is_main and cfg.eval.n_episodes > 0 and step == tcfg.steps and not interrupted:
        with deployable() as deploy:
            summary = run_eval(cfg, deploy, run_dir / "eval.json", video=cfg.eval.video, progress=progress)
        writer.add_scalar("eval/success_rate", summary["success_rate"], step)
        result["eval"] = summary
    if writer is not None:
        writer.close()
    return result


def _gather_rng_states(world: int) -> list[torch.Tensor]:
    """Every rank's torch RNG state (ranks draw different noise; resume restores each one's)."""
    state = torch.get_rng_state()
    if world == 1:
        return [state]
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, state)
    return states


@torch.no_grad()
def validation_loss(policy: Policy, sampler: SequenceSampler, batch_size: int, device: torch.device, seed: int,
                    n_batches: int = 4) -> float:
    """Mean loss on held-out episodes over fixed windows and fixed noise, without touching the training RNG."""
    policy.eval()
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        losses = [
            policy.compute_loss({k: v.to(device) for k, v in to_torch(sampler.gather(rng.integers(0, len(sampler), batch_size))).items()})["loss"].item()
            for _ in range(n_batches)
        ]
    policy.train()
    return float(np.mean(losses))


def run_eval(cfg: DictConfig, policy: Policy, out_json: Path, video: bool = True, progress: bool = True) -> dict[str, Any]:
    """Roll the policy out in the task's env; write the summary JSON (and a video) next to it."""
    from protege.envs import make_env
    from protege.evaluation.rollout import evaluate
    from protege.fileio import write_json

    ecfg = cfg.eval
    env_kwargs = OmegaConf.to_container(cfg.task.env, resolve=True)
    if ecfg.max_episode_steps:
        env_kwargs["max_episode_steps"] = ecfg.max_episode_steps

    def env_fn(i: int) -> Any:
        return make_env(cfg.task.env_id, **env_kwargs, render_mode="rgb_array" if (video and i == 0) else None)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ecfg.seed)
        summary = evaluate(
            policy, env_fn, n_episodes=ecfg.n_episodes, n_envs=ecfg.n_envs, seed=ecfg.seed,
            video_path=out_json.with_suffix(".mp4") if video else None, video_episodes=ecfg.video_episodes,
            asynchronous=ecfg.asynchronous, progress=progress, temporal_ensemble=ecfg.get("temporal_ensemble", "policy"),
            chunk_join=ecfg.get("chunk_join"), delay_steps=int(ecfg.get("delay_steps") or 0),
            execute_steps=ecfg.get("execute_steps"),
        )
    summary["task"] = cfg.task.name
    summary["policy"] = cfg.policy.name
    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_json, summary)
    return summary
