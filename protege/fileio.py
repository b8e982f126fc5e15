"""Files on disk: atomic writes and reading checkpoint folders.

The bottom layer of the package (it imports nothing of protege but `errors`), so that policies (a
pretrained encoder), the runtime, evaluation and training all read checkpoints through it and the
imports point one way: cli -> training -> evaluation -> runtime -> policies -> ... -> fileio
(tests/test_imports.py checks it). Writing checkpoints and building policies from them live above,
in training/checkpoint.py and policies/base.py.

    <checkpoint>/model.safetensors       weights (no normalizer)
    <checkpoint>/normalizer.safetensors  normalizer statistics
    <checkpoint>/config.yaml             the resolved training config, including `shape_meta`
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from protege.errors import ProtegeError

FILES = ("model.safetensors", "normalizer.safetensors", "config.yaml")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, fsync, rename over it: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


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


def load_config(ckpt_dir: str | Path) -> Any:  # -> omegaconf.DictConfig
    """The checkpoint's resolved training config; every checkpoint file must be there."""
    from omegaconf import OmegaConf

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    for name in FILES:
        if not (ckpt_dir / name).exists():
            raise ProtegeError(f"{ckpt_dir}: checkpoint is missing {name}")
    return OmegaConf.load(ckpt_dir / "config.yaml")


def read_weights(ckpt_dir: str | Path, normalizer: bool = True) -> dict[str, Any]:
    """{name: tensor} of the checkpoint's model weights, plus the normalizer's statistics."""
    from safetensors.torch import load_file

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    state = load_file(ckpt_dir / "model.safetensors")
    if normalizer:
        state.update(load_file(ckpt_dir / "normalizer.safetensors"))
    return state
