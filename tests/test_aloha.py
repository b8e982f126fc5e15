import os

import numpy as np
import pytest
import torch

from protege.cli import main
from protege.datasets.frames import describe_codec
from protege.datasets.replay_buffer import ReplayBuffer
from protege.envs import make_env, make_expert
from protege.envs.aloha import START_ARM_POSE, normalize_gripper
from protege.envs.collect import run_expert_episode
from protege.errors import ConfigError
from protege.evaluation.rollout import evaluate

TASKS = ["aloha_transfer_cube", "aloha_insertion"]
needs_gl = pytest.mark.skipif(os.environ.get("MUJOCO_GL") != "osmesa",
                              reason="no offscreen renderer (install libosmesa6: scripts/setup.sh does)")


@pytest.mark.parametrize("env_id", TASKS)
def test_scripted_experts_succeed(env_id):
    env = make_env(env_id)
    expert = make_expert(env_id, env, seed=0)
    results = [run_expert_episode(env, expert, seed) for seed in (0, 1)]
    assert all(success for _, success in results)
    ep, _ = results[0]
    assert ep["obs/state"].shape == (400, 14) and ep["action"].shape == (400, 14)
    assert ep["obs/state"].dtype == np.float32 and ep["action"].dtype == np.float32
    assert env.unwrapped._renderer is None  # state-only: no GL context was ever created
    # the expert's actions are joint targets: the arms follow them closely (not end-effector poses)
    arms = np.r_[0:6, 7:13]
    assert np.abs(ep["obs/state"][1:, arms] - ep["action"][:-1, arms]).mean() < 0.05


def test_terminate_on_success_ends_the_episode_early():
    env = make_env("aloha_transfer_cube", terminate_on_success=True)
    ep, success = run_expert_episode(env, make_expert("aloha_transfer_cube", env), seed=3)
    assert success and len(ep["action"]) < 400


class _Hold(torch.nn.Module):
    """A do-nothing policy: holds the start pose (joint targets = ACT's start pose, grippers closed)."""

    n_obs_steps, n_action_steps, horizon, action_dim = 1, 8, 8, 14
    obs_keys = ["obs/state"]

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        pose = np.concatenate([START_ARM_POSE[:6], [normalize_gripper(START_ARM_POSE[6])]] * 2)
        self.pose = torch.tensor(pose, dtype=torch.float32)

    @property
    def device(self):
        return self.p.device

    def predict_action(self, obs):
        return self.pose.expand(len(obs["obs/state"]), self.n_action_steps, 14)

    def reset(self):
        pass


@pytest.mark.parametrize("env_id", TASKS)
def test_do_nothing_fails_in_evaluate(env_id):
    out = evaluate(_Hold(), lambda i: make_env(env_id), n_episodes=2, n_envs=2, seed=7, progress=False)
    assert out["success_rate"] == 0.0 and out["mean_length"] == 400
    assert out["max_stage_counts"] == {"0": 2}  # nothing was ever touched


class _OpenLoopExpert(_Hold):
    """The scripted expert as a policy: plans the whole episode from the first observation's object
    poses (obs/env_state) and returns it as one 400-step chunk."""

    n_action_steps = horizon = 400
    obs_keys = ["obs/env_state"]

    def __init__(self, task):
        super().__init__()
        from protege.envs.aloha import _EndEffectorSim

        self.sim = _EndEffectorSim(task)

    def predict_action(self, obs):
        plans = [self.sim.joint_trajectory(s[-1].double().numpy(), 400) for s in obs["obs/env_state"]]
        return torch.tensor(np.stack(plans), dtype=torch.float32)


def test_expert_through_evaluate_succeeds():
    out = evaluate(_OpenLoopExpert("transfer_cube"), lambda i: make_env("aloha_transfer_cube"), n_episodes=2,
                   n_envs=2, seed=11, progress=False)
    assert out["success_rate"] == 1.0 and out["max_stage_counts"] == {"4": 2}


@pytest.mark.parametrize("env_id", TASKS)
def test_seeded_resets_are_reproducible_and_distinct(env_id):
    env = make_env(env_id)
    a, b, c = (env.reset(seed=s)[0] for s in (3, 3, 4))
    for key in ("state", "env_state"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["state"].shape == (14,) and a["state"].dtype == np.float32
    assert not np.allclose(a["env_state"], c["env_state"])  # objects elsewhere
    # the same seed gives the same trajectory under the same actions
    act = env.action_space.sample()
    env.reset(seed=3)
    s1 = env.step(act)[0]["state"]
    env.reset(seed=3)
    np.testing.assert_array_equal(s1, env.step(act)[0]["state"])


def test_bad_config_and_actions():
    with pytest.raises(ConfigError, match="top"):
        make_env("aloha_transfer_cube", cameras=("topp",))
    with pytest.raises(ConfigError, match="image_size"):
        make_env("aloha_insertion", image_size=(64,))
    env = make_env("aloha_insertion")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"\(14,\)"):
        env.step(np.zeros(7))


@needs_gl
def test_camera_observations_and_render():
    env = make_env("aloha_transfer_cube", cameras=("top", "left_wrist"), image_size=(48, 64), render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    for cam in ("top", "left_wrist"):
        img = obs[cam]
        assert img.shape == (48, 64, 3) and img.dtype == np.uint8 and img.std() > 5
        assert env.observation_space[cam].contains(img)
    assert not np.array_equal(obs["top"], obs["left_wrist"])
    expert = make_expert("aloha_transfer_cube", env)
    for _ in range(60):  # the arms move: the top view changes
        obs2, *_ = env.step(expert(obs))
    assert np.abs(obs2["top"].astype(int) - obs["top"]).mean() > 0.5
    frame = env.render()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
    # the decimated meshes the cameras draw look like the originals at this size
    full = make_env("aloha_transfer_cube", cameras=("top",), image_size=(48, 64), render_max_faces=None)
    ref = full.reset(seed=0)[0]["top"]
    assert np.abs(ref.astype(int) - obs["top"]).mean() < 4
    full.close()
    env.close()


@needs_gl
def test_collect_writes_image_buffer(tmp_path, capsys):
    out = tmp_path / "tc.zarr"
    rc = main(["collect", "task=aloha_transfer_cube", "n_episodes=1", f"out={out}", "task.env.image_size=[48,64]"])
    assert rc == 0
    buf = ReplayBuffer.open(str(out))
    assert buf.n_episodes == 1 and buf.n_steps == 400 and buf.attrs["fps"] == 50
    assert buf.kinds["obs/top"] == "image" and buf.kinds["obs/state"] == "state" and buf.kinds["action"] == "action"
    top = buf.data["obs/top"]
    assert top.shape == (400, 48, 64, 3) and top.dtype == np.uint8
    assert top.chunks == (1, 48, 64, 3)  # one JPEG frame per chunk: a window decodes only its frames
    assert describe_codec(top) == "jpeg:95, 1 frame/chunk"  # the default codec of collected frames
    buf.validate_data()


@pytest.mark.slow
@pytest.mark.parametrize("env_id", TASKS)
def test_scripted_expert_success_rate(env_id):
    """The demos' quality bar: >= 90 % over 20 seeds (see README for the measured rates)."""
    env = make_env(env_id)
    expert = make_expert(env_id, env, seed=0)
    successes = [run_expert_episode(env, expert, seed)[1] for seed in range(100, 120)]
    assert np.mean(successes) >= 0.9
