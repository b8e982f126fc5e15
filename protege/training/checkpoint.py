"""Checkpoints: one self-contained folder per save, written to a temp dir and renamed into place.

    <run_dir>/checkpoints/step_<N>/
        model.safetensors       deployable weights (the EMA weights when EMA is on), no normalizer
        normalizer.safetensors  normalizer statistics
        config.yaml             the resolved config, including `shape_meta`
        train_state.pt          step, online weights, optimizer, LR scheduler, EMA, RNG states
                                (plain tensors and numbers: loads with weights_only=True)
    <run_dir>/checkpoints/latest   name of the newest complete checkpoint (atomically replaced)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from protege.errors import ProtegeError
from protege.policies.base import Policy

FILES = ("model.safetensors", "normalizer.safetensors", "config.yaml")


def _split_state(policy: Policy) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model, norm = {}, {}
    for k, v in policy.state_dict().items():
        (norm if k.startswith("normalizer.") else model)[k] = v.detach().contiguous().cpu()
    return model, norm


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    ckpt_root: Path, step: int, policy: Policy, cfg: DictConfig, train_state: dict[str, Any] | None = None, keep: int = 2
) -> Path:
    """Write checkpoint `step_<step>` atomically, point `latest` at it, keep the newest `keep`."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    try:
        model, norm = _split_state(policy)
        save_file(model, tmp / "model.safetensors")
        save_file(norm, tmp / "normalizer.safetensors")
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(ckpt_root / "latest", final.name)
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run dir / checkpoints dir whose newest checkpoint is used."""
    path = Path(path)
    for cand in (path, path / "checkpoints"):
        if (cand / "model.safetensors").exists():
            return cand
        if (cand / "latest").exists():
            return cand / (cand / "latest").read_text().strip()
    raise ProtegeError(
        f"{path}: expected a checkpoint folder ({', '.join(FILES)}) or a run directory with checkpoints/latest, found neither"
    )


def load_config(ckpt_dir: Path) -> DictConfig:
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    for name in FILES:
        if not (ckpt_dir / name).exists():
            raise ProtegeError(f"{ckpt_dir}: checkpoint is missing {name}")
    return OmegaConf.load(ckpt_dir / "config.yaml")


def load_policy(ckpt_dir: str | Path, cfg: DictConfig | None = None, device: str | torch.device = "cpu",
                runtime: str = "eager") -> Policy:
    """Rebuild the policy from its saved config and load weights + normalizer (strictly).
    `runtime` (auto|onnx|aoti|eager): compile its inference, the artefact cached in `<ckpt_dir>/export/`."""
    from protege.policies import build_policy

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    cfg = load_config(ckpt_dir) if cfg is None else cfg
    from protege.policies.nets.encoder import restoring_weights

    with restoring_weights():  # every weight comes from this checkpoint (not from a pretrained encoder's)
        policy = build_policy(cfg.policy, OmegaConf.to_container(cfg.shape_meta))
    state = load_file(ckpt_dir / "model.safetensors")
    state.update(load_file(ckpt_dir / "normalizer.safetensors"))
    policy.load_state_dict(state, strict=True)
    policy = policy.to(device).eval()
    policy.accelerate(ckpt_dir / "export", runtime)
    return policy


def load_train_state(ckpt_dir: Path) -> dict[str, Any]:
    return torch.load(Path(ckpt_dir) / "train_state.pt", map_location="cpu", weights_only=True)
