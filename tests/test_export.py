"""Diffusion Policy's DDIM loop through an exported runtime (protege/policies/export.py): same
outputs as eager PyTorch, cached next to the checkpoint, rebuilt when stale, eager when the runtime is missing."""

import logging
import pickle
import sys

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from protege.cli import compose
from protege.training import checkpoint as ckpt

SHAPE_META = {"obs/state": {"shape": [6], "kind": "state"}, "action": {"shape": [3], "kind": "action"}}


def make_policy(*overrides: str):
    from protege.policies import build_policy

    # a small U-Net and 3 DDIM steps: exporting cost grows with the unrolled graph
    cfg = compose("train", ["policy=diffusion", "policy.down_dims=[8,16]", "policy.step_embed_dim=8",
                            "policy.num_inference_steps=3", *overrides])
    with open_dict(cfg):
        cfg.shape_meta = SHAPE_META
    p = build_policy(cfg.policy, SHAPE_META)
    rng = np.random.default_rng(0)
    p.normalizer.fit({"obs/state": rng.uniform(-5, 5, (200, 6)), "action": rng.uniform(-2, 2, (200, 3))})
    return p.eval(), cfg


def predict(p, obs, seed=0):
    torch.manual_seed(seed)
    return p.predict_action(obs)


def test_films_per_step_equal_per_step_conditioning():
    p, _ = make_policy()
    cond, ts = torch.randn(3, 12), torch.tensor([90, 40, 3])
    per_step = p.unet.films_per_step(ts, cond)
    for k, t in enumerate(ts):
        for a, b in zip(per_step[k], p.unet.films(t.expand(3), cond)):
            torch.testing.assert_close(a, b)


def test_onnx_denoising_loop_equals_eager_and_is_cached(tmp_path, caplog):
    p, _ = make_policy()
    obs1, obs4 = {"obs/state": torch.randn(1, 2, 6)}, {"obs/state": torch.randn(4, 2, 6)}
    eager1, eager4 = predict(p, obs1), predict(p, obs4)
    assert p.accelerate(tmp_path, "onnx") == "onnx"
    files = list(tmp_path.glob("diffusion-DDIMScheduler-3-onnx-*.onnx"))
    assert len(files) == 1
    # the exported graph keeps the batch dynamic: batch 1 (runner) and N (vector-env eval)
    assert (predict(p, obs1) - eager1).abs().max() < 1e-4
    assert (predict(p, obs4) - eager4).abs().max() < 1e-4
    assert not torch.equal(predict(p, obs1, seed=1), eager1)  # the noise is still an input, not baked in

    # same weights and settings: reused, not rebuilt
    mtime = files[0].stat().st_mtime_ns
    q, _ = make_policy()
    q.load_state_dict(p.state_dict())
    with caplog.at_level(logging.INFO, logger="protege.export"):
        assert q.accelerate(tmp_path, "auto") == "onnx"
    assert "using the cached" in caplog.text and files[0].stat().st_mtime_ns == mtime

    # other weights (a retrained checkpoint): a new artefact replaces the stale one
    with torch.no_grad():
        q.unet.final[1].bias.add_(0.5)
    q.accelerate(tmp_path, "onnx")
    new = list(tmp_path.glob("*.onnx"))
    assert len(new) == 1 and new[0] != files[0]
    assert (predict(q, obs1) - predict(p, obs1)).abs().max() > 1e-3

    # picklable for the runner's inference process: the session reopens on first use
    r = pickle.loads(pickle.dumps(q))
    assert (predict(r, obs1) - predict(q, obs1)).abs().max() < 1e-6


def test_missing_runtime_falls_back_to_eager_with_a_log_line(tmp_path, caplog, monkeypatch):
    p, _ = make_policy()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with caplog.at_level(logging.WARNING, logger="protege.export"):
        assert p.accelerate(tmp_path, "onnx") == "eager"
    assert "not installed" in caplog.text and "running eager PyTorch" in caplog.text
    assert not list(tmp_path.iterdir())
    assert p.predict_action({"obs/state": torch.randn(1, 2, 6)}).shape == (1, 8, 3)


def test_ddpm_stays_eager(tmp_path):
    p, _ = make_policy("policy.inference_scheduler=ddpm", "policy.num_inference_steps=20")
    assert p.accelerate(tmp_path, "onnx") == "eager"


def test_load_policy_caches_the_export_next_to_the_checkpoint(tmp_path):
    p, cfg = make_policy()
    ckpt_dir = ckpt.save_checkpoint(tmp_path / "checkpoints", 1, p, cfg)
    q = ckpt.load_policy(ckpt_dir, runtime="auto")
    assert len(list((ckpt_dir / "export").glob("*.onnx"))) == 1
    obs = {"obs/state": torch.randn(1, 2, 6)}
    assert (predict(q, obs) - predict(p, obs)).abs().max() < 1e-4


@pytest.mark.slow
def test_aoti_denoising_loop_equals_eager(tmp_path):
    p, _ = make_policy()
    obs = {"obs/state": torch.randn(3, 2, 6)}
    eager = predict(p, obs)
    assert p.accelerate(tmp_path, "aoti") == "aoti"
    assert (predict(p, obs) - eager).abs().max() < 1e-4


def test_act_onnx_equals_eager_for_any_batch(tmp_path):
    """ACT's predict_action (conv backbone + transformer + normalisation) exported as one graph."""
    from protege.policies import build_policy

    meta = {"obs/state": {"shape": [5], "kind": "state"}, "obs/top": {"shape": [32, 40, 3], "kind": "image"},
            "action": {"shape": [4], "kind": "action"}}
    cfg = compose("train", ["policy=act_small", "policy.hidden_dim=32", "policy.dim_feedforward=64", "policy.n_heads=2",
                            "policy.n_encoder_layers=1", "policy.n_vae_encoder_layers=1", "policy.chunk_size=6",
                            "policy.n_action_steps=4", "policy.backbone_channels=[8,8]", "policy.backbone_strides=[2,2]"])
    torch.manual_seed(0)
    p = build_policy(cfg.policy, meta)
    rng = np.random.default_rng(0)
    p.normalizer.fit({"obs/state": rng.uniform(-3, 3, (100, 5)), "action": rng.uniform(-2, 2, (100, 4))})
    p.eval()
    obs = {b: {"obs/state": torch.randn(b, 1, 5), "obs/top": torch.randint(0, 256, (b, 1, 32, 40, 3), dtype=torch.uint8)}
           for b in (1, 3)}
    eager = {b: p.predict_action(o) for b, o in obs.items()}
    assert p.accelerate(tmp_path, "onnx") == "onnx"
    assert len(list(tmp_path.glob("act-6-onnx-*.onnx"))) == 1
    for b, o in obs.items():
        out = p.predict_action(o)
        assert out.shape == (b, 4, 4)
        assert (out - eager[b]).abs().max() < 1e-4
    assert p.accelerate(tmp_path, "eager") == "eager" and p._exported is None
