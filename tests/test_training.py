import subprocess
import sys

import numpy as np
import torch
from helpers import train_config
from omegaconf import open_dict
from safetensors.torch import load_file

from protege.training import checkpoint as ckpt
from protege.training.trainer import train

TINY_DP = ["policy=diffusion", "policy.down_dims=[16,32]", "policy.step_embed_dim=16", "train.batch_size=32"]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    common = ["task=pointmass", *TINY_DP, "train.steps=24", "train.ckpt_every=8", "train.val_every=5",
              "eval.n_episodes=0", "task.n_demos=8"]
    full = train(train_config(tmp_path / "a", *common), progress=False)["losses"]
    cfg = train_config(tmp_path / "b", *common, "train.stop_at=12")
    first = train(cfg, progress=False)["losses"]
    with open_dict(cfg):
        cfg.train.stop_at = None
        cfg.resume = True
    rest = train(cfg, progress=False)["losses"]
    assert len(first) == 12 and len(rest) == 12
    assert first + rest == full  # bit-exact on CPU
    assert len(set(full)) > 1


def test_checkpoint_is_self_contained(tmp_path):
    cfg = train_config(tmp_path, "task=pointmass", *TINY_DP, "train.steps=10", "eval.n_episodes=0", "task.n_demos=6")
    result = train(cfg, progress=False)
    ck = ckpt.resolve_checkpoint(result["run_dir"])
    assert ck.name == "step_00000010"
    for name in ("model.safetensors", "normalizer.safetensors", "config.yaml", "train_state.pt"):
        assert (ck / name).exists(), name
    assert not any(k.startswith("normalizer.") for k in load_file(ck / "model.safetensors"))
    state = torch.load(ck / "train_state.pt", weights_only=True)
    assert state["step"] == 10 and "optimizer" in state and "ema" in state
    assert not list((ck.parent).glob(".tmp-*"))  # no half-written checkpoint left behind
    policy, again = ckpt.load_policy(ck), ckpt.load_policy(result["run_dir"])
    obs = {"obs/state": torch.zeros(3, 2, 4)}
    torch.manual_seed(0)
    a = policy.predict_action(obs)
    torch.manual_seed(0)
    b = again.predict_action(obs)
    assert a.shape == (3, 8, 2) and torch.equal(a, b)


def test_amp_bf16_path_runs_on_cpu(tmp_path):
    cfg = train_config(tmp_path, "task=pointmass", *TINY_DP, "train.steps=6", "train.amp=bf16", "eval.n_episodes=0",
                       "task.n_demos=4")
    losses = train(cfg, progress=False)["losses"]
    assert len(losses) == 6 and all(np.isfinite(losses))


def test_ddp_with_gloo_on_cpu(tmp_path):
    """Two processes, DistributedDataParallel over gloo: the multi-GPU path, exercised on CPU."""
    run = tmp_path / "ddp"
    data = tmp_path / "pm.zarr"
    subprocess.run([sys.executable, "-m", "protege.cli", "collect", "task=pointmass", "n_episodes=6", f"out={data}"],
                   check=True, capture_output=True)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "protege.cli",
         "train", "task=pointmass", "policy=bc", "train.steps=8", "train.batch_size=16", f"dataset={data}",
         f"run_dir={run}", "eval.n_episodes=0", "device=cpu"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(ckpt.resolve_checkpoint(run) / "train_state.pt", weights_only=True)
    assert state["step"] == 8 and state["windows"] == 8 * 16 * 2  # position in the shared window stream
    assert len(state["rng"]["torch_ranks"]) == 2  # each rank's own noise stream, restored on resume
    assert not torch.equal(*state["rng"]["torch_ranks"])


def test_amp_auto_is_bf16_on_cpus_with_native_bf16(monkeypatch):
    import torch

    from protege.training import trainer

    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert trainer.amp_dtype("auto", cpu) == torch.bfloat16
    assert trainer.amp_dtype("none", cpu) is None
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert trainer.amp_dtype("auto", cpu) is None
    assert trainer.amp_dtype("bf16", cpu) == torch.bfloat16
