"""Checkpoints: one self-contained folder per save, written to a temp dir and renamed into place.

    <run_dir>/checkpoints/step_<N>/
        model.safetensors       deployable weights (the EMA weights when EMA is on), no normalizer
        normalizer.safetensors  normalizer statistics
        config.yaml             the resolved config, including `shape_meta`
        train_state.pt          step, online weights, optimizer, LR scheduler, EMA, RNG states
                                (plain tensors and numbers: loads with weights_only=True)
    <run_dir>/checkpoints/latest   name of the newest complete checkpoint (atomically replaced)

Writing lives here; reading (resolve_checkpoint, load_config, read_weights) in protege/fileio.py, a layer
below the policies, and load_policy (config -> policy + weights) in protege/policies/base.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

# reading lives a layer below (policies read checkpoints too); re-exported for callers of this module
from protege.fileio import FILES, atomic_write_text, load_config, resolve_checkpoint  # noqa: F401
from protege.policies.base import Policy, load_policy  # noqa: F401


def _split_state(policy: Policy) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model, norm = {}, {}
    for k, v in policy.state_dict().items():
        (norm if k.startswith("normalizer.") else model)[k] = v.detach().contiguous().cpu()
    return model, norm


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
    atomic_write_text(ckpt_root / "latest", final.name)
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_train_state(ckpt_dir: Path) -> dict[str, Any]:
    return torch.load(Path(ckpt_dir) / "train_state.pt", map_location="cpu", weights_only=True)
