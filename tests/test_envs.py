import numpy as np
import pytest
import torch

from protege.envs import make_env, make_expert
from protege.envs.collect import run_expert_episode
from protege.errors import ConfigError
from protege.evaluation.rollout import evaluate


@pytest.mark.parametrize("env_id,kwargs", [("pointmass", {}), ("pointmass_bimodal", {}), ("metaworld", {"task": "push-v3"})])
def test_scripted_experts_succeed(env_id, kwargs):
    env = make_env(env_id, **kwargs)
    expert = make_expert(env_id, env, seed=0)
    results = [run_expert_episode(env, expert, seed) for seed in range(5)]
    assert all(success for _, success in results)
    ep, _ = results[0]
    assert set(ep) == {"obs/state", "action"} and len(ep["obs/state"]) == len(ep["action"]) > 5


def test_bimodal_expert_uses_both_routes():
    env = make_env("pointmass_bimodal")
    expert = make_expert("pointmass_bimodal", env, seed=0)
    routes = []
    for seed in range(20):
        run_expert_episode(env, expert, seed)
        routes.append(env.route())
    assert routes.count("up") >= 5 and routes.count("down") >= 5


def test_metaworld_seeds_are_reproducible_and_distinct():
    env = make_env("metaworld", task="push-v3")
    a, b, c = (env.reset(seed=s)[0]["state"] for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_unknown_metaworld_task():
    with pytest.raises(ConfigError, match="push-v3"):
        make_env("metaworld", task="psh-v3")


class _Greedy(torch.nn.Module):
    """A deterministic stand-in policy (the pointmass expert's straight line), to test the rollout loop."""

    n_obs_steps, n_action_steps, horizon, action_dim = 2, 3, 4, 2
    obs_keys = ["obs/state"]

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.p.device

    def predict_action(self, obs):
        s = obs["obs/state"][:, -1]
        delta = (s[:, 2:] - s[:, :2]) / 0.05
        a = delta / delta.norm(dim=-1, keepdim=True).clamp(min=1.0)
        return a[:, None].repeat(1, self.n_action_steps, 1)

    def reset(self):
        pass


def test_rollout_results_do_not_depend_on_n_envs():
    env_fn = lambda i: make_env("pointmass")  # noqa: E731
    one = evaluate(_Greedy(), env_fn, n_episodes=7, n_envs=1, seed=5, progress=False)
    many = evaluate(_Greedy(), env_fn, n_episodes=7, n_envs=3, seed=5, progress=False)
    assert [e["length"] for e in one["episodes"]] == [e["length"] for e in many["episodes"]]
    assert [e["seed"] for e in many["episodes"]] == list(range(5, 12))
    assert one["success_rate"] == 1.0 and many["n_episodes"] == 7


def test_metaworld_camera_observations():
    import os

    if os.environ.get("MUJOCO_GL") != "osmesa":
        pytest.skip("no offscreen renderer (install libosmesa6: scripts/setup.sh does)")
    env = make_env("metaworld", task="push-v3", cameras=("corner",), image_size=32)
    obs, _ = env.reset(seed=0)
    img = obs["corner"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 5
    obs2, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0]))
    assert obs2["corner"].shape == (32, 32, 3)


def test_async_vector_env_gives_the_same_results():
    env_fn = lambda i: make_env("pointmass", render_mode="rgb_array" if i == 0 else None)  # noqa: E731
    sync = evaluate(_Greedy(), env_fn, n_episodes=4, n_envs=2, seed=9, progress=False)
    asyn = evaluate(_Greedy(), env_fn, n_episodes=4, n_envs=2, seed=9, progress=False, asynchronous=True)
    assert [e["length"] for e in sync["episodes"]] == [e["length"] for e in asyn["episodes"]]
    assert sync["success_rate"] == asyn["success_rate"] == 1.0
