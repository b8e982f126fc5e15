"""Shared test helpers: compose the real configs with overrides, run the trainer in a temp dir."""

from __future__ import annotations

from pathlib import Path

from omegaconf import open_dict

from protege.cli import compose

# tiny settings shared by tests that train: no eval/video unless a test asks for it
QUIET = ["train.log_every=1000", "train.val_every=0", "eval.video=false", "eval.n_envs=10"]


def train_config(tmp_path: Path, *overrides: str):
    cfg = compose("train", [*QUIET, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
        if not any(o.startswith("task.dataset=") for o in overrides):
            cfg.task.dataset = str(tmp_path / f"{cfg.task.name}.zarr")
    return cfg
