"""Inverse-dynamics pretraining: the IDM head predicts actions, a frozen pretrained encoder under a BC
head reaches the goal, fine-tuned checkpoints are self-contained, and mismatches give clear errors."""

import shutil

import numpy as np
import pytest
import torch
from helpers import train_config

from protege.datasets.replay_buffer import ReplayBuffer
from protege.datasets.sampler import SequenceSampler, to_torch
from protege.errors import DataError
from protege.policies.bc import BCPolicy
from protege.training.checkpoint import load_policy
from protege.training.trainer import train


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idm")
    data = tmp / "pointmass.zarr"
    cfg = train_config(tmp / "pre", "task=pointmass", "pretrain=idm", f"task.dataset={data}", "train.steps=800",
                       "train.batch_size=256", "train.val_ratio=0.1")
    result = train(cfg, progress=False)
    return tmp, data, result


def test_idm_head_predicts_actions_far_better_than_the_mean(pretrained):
    tmp, data, result = pretrained
    assert "eval" not in result  # a pretraining stage does not roll out
    model = load_policy(result["checkpoint"])
    buf = ReplayBuffer.load(data)
    held_out = np.arange(buf.n_episodes - 10, buf.n_episodes)  # scored on windows of the last 10 episodes
    sampler = SequenceSampler(buf, ["obs/state"], model.n_obs_steps, model.horizon, episodes=held_out)
    batch = to_torch(sampler.gather(np.arange(len(sampler))))
    batch = {k: v[~batch["action_is_pad"][:, 0]] for k, v in batch.items()}
    target = model.normalizer.normalize("action", batch["action"][:, 0])
    with torch.no_grad():
        idm_mse = (model.predict_next_action(batch) - target).pow(2).mean().item()
    mean_mse = (target - target.mean(0)).pow(2).mean().item()
    assert idm_mse < 0.1 * mean_mse, (idm_mse, mean_mse)
    with pytest.raises(NotImplementedError, match="idm_bc"):
        model.predict_action(batch)


def test_frozen_pretrained_encoder_with_bc_head_reaches_the_goal(pretrained, tmp_path):
    tmp, data, result = pretrained
    run = tmp_path / "bc_run"
    shutil.copytree(result["run_dir"], run)  # a copy we can delete to show the fine-tuned checkpoint stands alone
    cfg = train_config(tmp_path, "task=pointmass", "policy=idm_bc", f"policy.obs_encoder.checkpoint={run}",
                       "policy.obs_encoder.freeze=true", f"task.dataset={data}", "train.steps=1500",
                       "train.batch_size=256", "eval.n_episodes=50")
    out = train(cfg, progress=False)
    assert out["eval"]["success_rate"] >= 0.9, out["eval"]["success_rate"]
    pre, tuned = load_policy(result["checkpoint"]), load_policy(out["checkpoint"])
    for name, p in pre.obs_encoder.state_dict().items():  # frozen: weights unchanged; stats from pretraining
        ref = tuned.obs_encoder.state_dict()[name]
        if name.startswith("input_norm."):
            key, stat = name.removeprefix("input_norm.stats.").rsplit(".", 1)
            p = pre.normalizer.stats[key].get_buffer(stat) if stat != "fitted" else torch.tensor(True)
        assert torch.equal(p, ref), name
    shutil.rmtree(run)
    assert load_policy(out["checkpoint"]).obs_encoder is not None  # loads without the pretraining run


def test_mismatched_encoder_gives_a_clear_error(pretrained):
    _, _, result = pretrained
    ckpt = result["checkpoint"]
    arch = {"hidden_dims": [256, 256], "out_dim": 64}
    meta5 = {"obs/state": {"shape": [5], "kind": "state"}, "action": {"shape": [2], "kind": "action"}}
    with pytest.raises(DataError, match=r"\[obs/state\].*shape \[5\].*found \[4\]"):
        BCPolicy(meta5, obs_encoder={"checkpoint": ckpt, **arch})
    meta4 = {**meta5, "obs/state": {"shape": [4], "kind": "state"}}
    with pytest.raises(DataError, match=r"obs_encoder\.mlp\.4\.weight.*shape \[32, 256\].*found \[64, 256\]"):
        BCPolicy(meta4, obs_encoder={"checkpoint": ckpt, "hidden_dims": [256, 256], "out_dim": 32})
    meta_cam = {**meta4, "obs/cam": {"shape": [8, 8, 3], "kind": "image"}}
    with pytest.raises(DataError, match=r"\[obs/cam\].*an encoder over"):
        BCPolicy(meta_cam, obs_encoder={"checkpoint": ckpt, **arch})
    with pytest.raises(ValueError, match="freeze=true needs"):
        BCPolicy(meta4, obs_encoder={"freeze": True, **arch})


def test_checkpoint_without_an_encoder_is_refused(tmp_path):
    cfg = train_config(tmp_path, "task=pointmass", "policy=bc", "train.steps=2", "task.n_demos=3", "eval.n_episodes=0")
    ckpt = train(cfg, progress=False)["checkpoint"]
    meta = {"obs/state": {"shape": [4], "kind": "state"}, "action": {"shape": [2], "kind": "action"}}
    with pytest.raises(DataError, match=r"\[obs_encoder\].*none in policy 'bc'"):
        BCPolicy(meta, obs_encoder={"checkpoint": ckpt})


def test_image_encoder_shapes():
    meta = {"obs/state": {"shape": [3], "kind": "state"}, "obs/cam": {"shape": [16, 16, 3], "kind": "image"},
            "action": {"shape": [2], "kind": "action"}}
    policy = BCPolicy(meta, horizon=4, n_action_steps=2, obs_encoder={"out_dim": 8, "conv_channels": [4, 8]})
    policy.normalizer.fit({"obs/state": np.random.rand(10, 3), "action": np.random.rand(10, 2)})
    obs = {"obs/state": torch.rand(5, 2, 3), "obs/cam": torch.randint(0, 255, (5, 2, 16, 16, 3), dtype=torch.uint8)}
    assert policy.low_dim_obs(obs).shape == (5, 16)
    assert policy.predict_action(obs).shape == (5, 2, 2)


def test_bc_pretraining_baseline_learns_and_its_encoder_loads(pretrained, tmp_path):
    """objective=bc (the multitask-BC pretraining baseline): a_t from o_t alone; same encoder, loadable the same way."""
    _, data, _ = pretrained
    cfg = train_config(tmp_path / "pre_bc", "task=pointmass", "pretrain=idm", "policy.objective=bc", f"task.dataset={data}",
                       "train.steps=300", "train.batch_size=256", "train.val_ratio=0.1")
    result = train(cfg, progress=False)
    assert np.mean(result["losses"][-20:]) < 0.5 * np.mean(result["losses"][:20])
    model = load_policy(result["checkpoint"])
    assert model.objective == "bc" and model.head[0].in_features == model.obs_encoder.out_dim  # o_t only
    cfg = train_config(tmp_path / "ft", "task=pointmass", "policy=idm_bc", f"policy.obs_encoder.checkpoint={result['run_dir']}",
                       f"task.dataset={data}", "train.steps=10", "eval.n_episodes=0")
    tuned = load_policy(train(cfg, progress=False)["checkpoint"])
    torch.testing.assert_close(tuned.obs_encoder.state_dict()["mlp.0.weight"], model.obs_encoder.state_dict()["mlp.0.weight"])
