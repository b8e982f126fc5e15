"""ACT-JEPA: the target encoder is an EMA without gradient, both losses fall, it solves the point mass."""

import numpy as np
import pytest
import torch
from helpers import train_config

from protege.datasets.replay_buffer import ReplayBuffer
from protege.datasets.sampler import SequenceSampler, to_torch
from protege.envs.collect import collect
from protege.errors import ConfigError
from protege.policies.act_jepa import ACTJEPAPolicy
from protege.policies.base import build_policy, shape_meta_from_buffer
from protege.training.checkpoint import load_policy
from protege.training.trainer import train

TINY = dict(hidden_dim=64, n_heads=4, dim_feedforward=128, n_encoder_layers=2, n_decoder_layers=1, latent_dim=8,
            dropout=0.0, backbone_norm="group_norm", backbone_lr=None)


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    out = tmp_path_factory.mktemp("pm") / "demos.zarr"
    collect("pointmass", {}, n_episodes=8, out=out, fps=10, progress=False)
    return ReplayBuffer.load(out)


def _tiny(buf, chunk=10, **kw):
    policy = ACTJEPAPolicy(shape_meta_from_buffer(buf, ["obs/state"]), chunk_size=chunk, n_action_steps=chunk, **{**TINY, **kw})
    policy.normalizer.fit({k: buf.data[k][:] for k in ["obs/state", "action"]})
    sampler = SequenceSampler(buf, ["obs/state"], 1, chunk, horizon_obs_keys=policy.horizon_obs_keys)
    return policy, sampler


def test_target_encoder_is_an_ema_without_gradient(buffer):
    torch.manual_seed(0)
    policy, sampler = _tiny(buffer, target_momentum=0.9)
    target = list(policy.target_encoder.parameters())
    context = list(policy._context_modules().parameters())
    assert target and all(not p.requires_grad for p in target)
    opt_params = {id(p) for g in policy.optim_groups(1e-3) for p in g["params"]}
    assert not opt_params & {id(p) for p in target}  # the optimizer never touches the target
    opt = torch.optim.AdamW(policy.optim_groups(1e-3))
    out = policy.compute_loss(to_torch(sampler.gather(np.arange(16))))
    out["loss"].backward()
    assert all(p.grad is None for p in target)  # stop-gradient
    assert policy.predictor_head.weight.grad.abs().sum() > 0
    assert policy.state_proj.weight.grad.abs().sum() > 0  # the latent loss trains the context encoder
    before = [p.detach().clone() for p in target]
    opt.step()
    policy.on_train_step()
    for t, old, c in zip(target, before, context):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * c.detach())
    assert any(not torch.equal(t, old) for t, old in zip(target, before))


def test_both_losses_fall(buffer):
    torch.manual_seed(0)
    policy, sampler = _tiny(buffer)
    opt = torch.optim.AdamW(policy.optim_groups(1e-3), weight_decay=0.0)
    rng = np.random.default_rng(0)
    hist = []
    for _ in range(250):
        out = policy.compute_loss(to_torch(sampler.gather(rng.integers(0, len(sampler), 32))))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        policy.on_train_step()
        hist.append((out["l1"].item(), out["latent"].item()))
    first, last = np.mean(hist[:10], axis=0), np.mean(hist[-10:], axis=0)
    assert last[0] < 0.4 * first[0], (first, last)  # action L1
    assert last[1] < 0.5 * first[1], (first, last)  # latent prediction L1 against a moving target
    assert last[1] > 1e-3  # and the targets did not collapse to a constant the predictor matches trivially


def test_needs_state_and_full_chunk(buffer):
    meta = {"obs/top": {"shape": [32, 32, 3], "kind": "image"}, "action": {"shape": [2], "kind": "action"}}
    with pytest.raises(ConfigError, match="no state observation key"):
        ACTJEPAPolicy(meta, chunk_size=4, n_action_steps=4, **TINY)
    policy, _ = _tiny(buffer)
    plain = SequenceSampler(buffer, ["obs/state"], 1, 10)  # without horizon_obs_keys
    with pytest.raises(ValueError, match="horizon_obs_keys"):
        policy.compute_loss(to_torch(plain.gather(np.arange(4))))


def test_act_jepa_learns_pointmass_through_the_trainer(tmp_path):
    cfg = train_config(tmp_path, "task=pointmass", "policy=act_jepa_small", "policy.chunk_size=10", "policy.n_action_steps=5",
                       "policy.hidden_dim=64", "policy.dim_feedforward=128", "policy.n_encoder_layers=1",
                       "policy.dropout=0.0", "train.steps=800", "train.batch_size=32", "train.lr=1e-3",
                       "train.warmup_steps=50", "eval.n_episodes=50")
    result = train(cfg, progress=False)
    assert result["eval"]["success_rate"] >= 0.8, result["eval"]["success_rate"]
    policy = load_policy(cfg.run_dir)
    assert isinstance(policy, ACTJEPAPolicy)
    # the EMA ran in the trainer: the target left its init (rebuilt from the same seed) towards the context
    torch.manual_seed(cfg.seed)
    init = build_policy(cfg.policy, policy.shape_meta)
    target, context = policy.target_encoder["state_proj"].weight, policy.state_proj.weight
    start = init.target_encoder["state_proj"].weight
    assert torch.equal(start, init.state_proj.weight)  # the target starts as a copy of the context encoder
    assert (target - context).abs().mean() < 0.5 * (start - context).abs().mean()


def test_images_in_the_context_proprioception_in_the_target():
    meta = {"obs/state": {"shape": [3], "kind": "state"}, "obs/top": {"shape": [32, 32, 3], "kind": "image"},
            "action": {"shape": [2], "kind": "action"}}
    policy = ACTJEPAPolicy(meta, chunk_size=4, n_action_steps=4, **TINY)
    policy.normalizer.fit({"obs/state": np.random.randn(10, 3), "action": np.random.randn(10, 2)})
    assert policy.horizon_obs_keys == ("obs/state",)  # cameras stay at the current step
    batch = {"obs/state": torch.randn(2, 4, 3), "obs/top": torch.randint(0, 255, (2, 1, 32, 32, 3), dtype=torch.uint8),
             "action": torch.randn(2, 4, 2), "action_is_pad": torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]).bool()}
    out = policy.compute_loss(batch)
    out["loss"].backward()
    assert set(out) == {"loss", "l1", "kl", "latent"} and torch.isfinite(out["loss"])
    assert policy.backbones[0][0].weight.grad.abs().sum() > 0
    obs = {"obs/state": batch["obs/state"][:, :1], "obs/top": batch["obs/top"]}
    assert policy.predict_action(obs).shape == (2, 4, 2)  # inference needs only the current step
