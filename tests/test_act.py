"""ACT: temporal ensembling by hand, CVAE behaviour, overfitting real windows, learning, env checks."""

from unittest import mock

import numpy as np
import pytest
import torch
from helpers import train_config

from protege.datasets.replay_buffer import ReplayBuffer
from protege.datasets.sampler import SequenceSampler, to_torch
from protege.envs import make_env
from protege.envs.collect import collect
from protege.errors import ConfigError
from protege.evaluation.rollout import evaluate
from protege.policies.act import ACTPolicy, sine_2d
from protege.policies.base import shape_meta_from_buffer
from protege.runtime.chunking import ChunkQueue, TemporalEnsembler, make_executor
from protege.training.checkpoint import load_policy
from protege.training.trainer import train

TINY = dict(hidden_dim=64, n_heads=4, dim_feedforward=128, n_encoder_layers=2, n_decoder_layers=1,
            n_vae_encoder_layers=2, latent_dim=8, dropout=0.0, backbone_norm="group_norm", backbone_lr=None)


def test_temporal_ensembling_hand_worked():
    # m = ln 2: weights 1, 1/2, 1/4 from the oldest prediction to the newest
    te = TemporalEnsembler(m=float(np.log(2)))
    te.add(np.array([[1.0], [2.0], [3.0]]), start=0)
    assert te.action(0)[0] == pytest.approx(1.0)
    te.add(np.array([[10.0], [20.0], [30.0]]), start=1)
    assert te.action(1)[0] == pytest.approx((2 * 1 + 10 * 0.5) / 1.5)
    te.add(np.array([[100.0], [200.0], [300.0]]), start=2)
    assert te.action(2)[0] == pytest.approx((3 * 1 + 20 * 0.5 + 100 * 0.25) / 1.75)
    # the first chunk ends at step 2: step 3 averages the other two only
    assert te.action(3)[0] == pytest.approx((30 * 1 + 200 * 0.5) / 1.5)
    assert te.action(5) is None  # nothing covers step 5: the caller holds
    # m = 0 is a plain mean; a chunk that arrives late still counts by its own start step
    te = TemporalEnsembler(m=0.0)
    te.add(np.array([[4.0], [6.0]]), start=1)
    te.add(np.array([[0.0], [2.0], [8.0]]), start=0)
    assert te.action(1)[0] == pytest.approx((2.0 + 4.0) / 2)


def test_chunk_queue_and_executor_choice():
    q = ChunkQueue()
    assert q.needs_chunk(0)
    q.add(np.arange(3.0)[:, None], start=0)
    assert [q.action(t)[0] for t in range(3)] == [0.0, 1.0, 2.0]
    assert q.needs_chunk(3) and q.action(3) is None
    assert isinstance(make_executor(None), ChunkQueue) and isinstance(make_executor(0.01), TemporalEnsembler)


def test_sine_2d_matches_detr_shape_and_range():
    pos = sine_2d(3, 4, 16)
    assert pos.shape == (12, 16) and pos.abs().max() <= 1.0
    assert not torch.allclose(pos[0], pos[1]) and not torch.allclose(pos[0], pos[4])  # x and y both vary


@pytest.fixture(scope="module")
def image_buffer(tmp_path_factory):
    out = tmp_path_factory.mktemp("pm_img") / "demos.zarr"
    collect("pointmass", {"cameras": ("top",), "image_size": 32}, n_episodes=6, out=out, fps=10, progress=False)
    return ReplayBuffer.load(out)


def _tiny_act(buf, **kw):
    keys = ["obs/state", "obs/top"]
    policy = ACTPolicy(shape_meta_from_buffer(buf, keys), chunk_size=10, n_action_steps=10, **{**TINY, **kw})
    policy.normalizer.fit({k: buf.data[k] for k in ["obs/state", "action"]})
    return policy, SequenceSampler(buf, keys, 1, 10)


def test_act_overfits_real_windows_and_kl_behaves(image_buffer):
    torch.manual_seed(0)
    # the small conv trunk: what is tested is the CVAE overfitting, and a ResNet-18 costs 10x the time here
    policy, sampler = _tiny_act(image_buffer, backbone="conv", backbone_channels=[16, 32, 32, 32])
    batch = to_torch(sampler.gather(np.random.default_rng(0).integers(0, len(sampler), 8)))
    opt = torch.optim.AdamW(policy.optim_groups(1e-3), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    kls = []
    for _ in range(300):
        out = policy.compute_loss(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        schedule.step()
        kls.append(out["kl"].item())
    policy.eval()
    with torch.no_grad():
        l1 = policy.compute_loss(batch)["l1"].item()
    assert l1 < 0.02, l1
    assert max(kls) > 1e-3  # the posterior was used: the KL term was active during training
    obs = {k: batch[k] for k in policy.obs_keys}
    torch.manual_seed(1)
    a = policy.predict_action(obs)
    torch.manual_seed(2)
    b = policy.predict_action(obs)
    assert a.shape == (8, 10, 2) and torch.equal(a, b)  # z = 0 at inference: deterministic


def test_every_decoder_layer_gets_gradient(image_buffer):
    policy, sampler = _tiny_act(image_buffer, n_decoder_layers=3)
    policy.compute_loss(to_torch(sampler.gather(np.arange(4))))["loss"].backward()
    for i, layer in enumerate(policy.decoder):
        # (the first layer's self-attention values are the zero queries, so test the other blocks)
        for name, p in [("cross_attn", layer.cross_attn.in_proj_weight), ("ff", layer.ff[0].weight)]:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"decoder layer {i} {name} got no gradient"
    assert policy.backbones[0][0].weight.grad.abs().sum() > 0  # images reach the loss


def test_backbone_learning_rate_group(image_buffer):
    policy, _ = _tiny_act(image_buffer, backbone_lr=1e-5)
    groups = policy.optim_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-5]
    assert sum(len(g["params"]) for g in groups) == len([p for p in policy.parameters() if p.requires_grad])


def test_act_learns_pointmass_state_only(tmp_path):
    cfg = train_config(tmp_path, "task=pointmass", "policy=act_small", "policy.chunk_size=10", "policy.n_action_steps=5",
                       "policy.hidden_dim=64", "policy.dim_feedforward=128", "policy.n_encoder_layers=1",
                       "policy.n_vae_encoder_layers=1", "policy.dropout=0.0", "train.steps=1000", "train.batch_size=32",
                       "train.lr=1e-3",
                       "train.warmup_steps=50", "eval.n_episodes=50")
    result = train(cfg, progress=False)
    assert result["eval"]["success_rate"] >= 0.8, result["eval"]["success_rate"]
    # temporal ensembling runs through the same evaluation path
    policy = load_policy(cfg.run_dir)
    te = evaluate(policy, lambda i: make_env("pointmass"), n_episodes=20, n_envs=5, temporal_ensemble=0.1, progress=False)
    assert te["temporal_ensemble"] == 0.1 and te["success_rate"] >= 0.8, te["success_rate"]


def test_camera_mismatch_fails_before_rollout(image_buffer):
    policy, _ = _tiny_act(image_buffer)
    calls = []

    def env_fn(size, cameras):
        def make(i):
            calls.append(i)
            return make_env("pointmass", cameras=cameras, image_size=size)
        return make

    with pytest.raises(ConfigError, match=r"'top' with shape \(32, 32, 3\) but the env gives \(48, 48, 3\)"):
        evaluate(policy, env_fn(48, ("top",)), n_episodes=2, n_envs=1, progress=False)
    with pytest.raises(ConfigError, match="trained on image 'top'"):
        evaluate(policy, env_fn(32, ()), n_episodes=2, n_envs=1, progress=False)


@pytest.mark.parametrize("shared", [False, True])
def test_multi_camera_tokens_and_backbones(shared):
    meta = {"obs/state": {"shape": [3], "kind": "state"}, "obs/a": {"shape": [32, 64, 3], "kind": "image"},
            "obs/b": {"shape": [64, 32, 3], "kind": "image"}, "action": {"shape": [2], "kind": "action"}}
    policy = ACTPolicy(meta, chunk_size=4, n_action_steps=4, shared_backbone=shared, **TINY)
    policy.normalizer.fit({"obs/state": np.random.randn(10, 3), "action": np.random.randn(10, 2)})
    assert len(policy.backbones) == (1 if shared else 2)
    obs = {"obs/state": torch.randn(2, 1, 3), "obs/a": torch.zeros(2, 1, 32, 64, 3, dtype=torch.uint8),
           "obs/b": torch.full((2, 1, 64, 32, 3), 255, dtype=torch.uint8)}
    assert policy.predict_action(obs).shape == (2, 4, 2)
    batch = {**obs, "action": torch.randn(2, 4, 2), "action_is_pad": torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]).bool()}
    out = policy.compute_loss(batch)
    assert set(out) == {"loss", "l1", "kl"} and torch.isfinite(out["loss"])


def test_last_cvae_layer_computes_only_the_cls_token():
    """`n_out=1` gives the first token of the full layer's output (the CVAE reads only CLS)."""
    from protege.policies.act import TransformerLayer

    torch.manual_seed(0)
    layer = TransformerLayer(32, 4, 64, dropout=0.0).eval()
    x, pos = torch.randn(3, 9, 32), torch.randn(1, 9, 32).expand(3, -1, -1)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    full = layer(x, pos, pad_mask=pad)
    first = layer(x, pos, pad_mask=pad, n_out=1)
    assert first.shape == (3, 1, 32)
    torch.testing.assert_close(first, full[:, :1], rtol=1e-5, atol=1e-5)


def test_attention_matches_torch_multihead_attention_and_runs_fp32_under_bf16():
    """ACT's Attention has nn.MultiheadAttention's parameters and outputs (padding mask included); under
    CPU bf16 autocast its softmax(QK^T)V runs in fp32 (torch's bf16 CPU flash attention is several times
    slower), and the result stays within bf16 rounding of the fp32 one."""
    from protege.policies.act import Attention

    torch.manual_seed(0)
    ours, ref = Attention(32, 4).eval(), torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())  # same names: checkpoints written with either load
    q, kv = torch.randn(3, 5, 32), torch.randn(3, 9, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    expected = ref(q, kv, kv, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(ours(q, kv, kv, pad), expected, rtol=1e-5, atol=1e-5)
    seen = []
    hook = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(args[0].dtype)
        return hook(*args, **kwargs)

    with torch.autocast("cpu", dtype=torch.bfloat16), mock.patch("torch.nn.functional.scaled_dot_product_attention", spy):
        low = ours(q, kv, kv, pad)
    assert seen == [torch.float32] and low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)
