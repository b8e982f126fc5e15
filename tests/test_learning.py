"""Learning tests: tiny models on tiny tasks must actually learn (success / route bounds)."""

import pytest
from helpers import train_config

from protege.training.trainer import train


def test_bc_reaches_the_pointmass_goal(tmp_path):
    cfg = train_config(tmp_path, "task=pointmass", "policy=bc", "train.steps=1500", "train.batch_size=256",
                       "eval.n_episodes=50")
    result = train(cfg, progress=False)
    assert result["eval"]["success_rate"] >= 0.9, result["eval"]["success_rate"]
    assert result["losses"][-1] < 0.1 * result["losses"][0]


@pytest.fixture(scope="module")
def bimodal_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bimodal")
    common = ["task=pointmass_bimodal", "eval.n_episodes=100", f"task.dataset={tmp / 'demos.zarr'}"]
    dp = train(train_config(tmp / "dp", *common, "policy=diffusion", "policy.down_dims=[32,64]",
                            "policy.step_embed_dim=32", "train.steps=1500", "train.batch_size=128"), progress=False)
    bc = train(train_config(tmp / "bc", *common, "policy=bc", "train.steps=1500", "train.batch_size=256"), progress=False)
    return dp["eval"], bc["eval"]


def test_diffusion_policy_uses_both_routes(bimodal_runs):
    dp, _ = bimodal_runs
    routes = dp["route_counts"]
    assert routes.get("up", 0) >= 30 and routes.get("down", 0) >= 30, routes  # each route in >= 30 % of 100


def test_mse_bc_does_not_use_both_routes(bimodal_runs):
    _, bc = bimodal_runs
    routes = bc["route_counts"]
    assert min(routes.get("up", 0), routes.get("down", 0)) < 30, routes
