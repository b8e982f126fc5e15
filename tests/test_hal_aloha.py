"""Robots declare their features: the bimanual ALOHA (14-D, two arms with a gripper each) runs through
the HAL (`AlohaRobot`, the runner, the safety layer, the recording) and matches gymnasium evaluation
on the same seeds, episode by episode."""

from __future__ import annotations

import numpy as np
import pytest

import protege.policies.diffusion  # noqa: F401  (diffusers before mujoco, see test_runtime.py)
from protege.datasets.replay_buffer import ReplayBuffer
from protege.envs import make_env, make_hardware_task
from protege.evaluation.rollout import evaluate
from protege.hardware.aloha_robot import AlohaRobot
from protege.hardware.base import JointPositionSpace
from protege.runtime.runner import Runner, RunnerSettings
from tests.test_aloha import _OpenLoopExpert


def test_aloha_declares_two_arms_and_the_action_layout() -> None:
    robot = AlohaRobot()
    f = robot.features
    assert f.n_joints == 12 and f.n_grippers == 2 and [a.name for a in f.arms] == ["left_arm", "right_arm"]
    space = JointPositionSpace(f)
    assert space.dim == 14  # ACT's layout: [left 6, left gripper, right 6, right gripper]
    a = np.arange(14.0)
    q, _, g = space.split(a, None)
    assert q.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12] and g.tolist() == [6, 13]
    robot.connect()
    obs = robot.read()
    assert obs.get("left_arm").shape == (6,) and obs.get("right_arm_gripper").shape == (1,)
    with pytest.raises(Exception, match="needs one arm with Cartesian kinematics"):
        Runner(_OpenLoopExpert("transfer_cube"), robot, "ee_delta", ["joint_pos"], None, None,
               RunnerSettings(rate_hz=50, max_steps=5))


def test_aloha_through_the_hal_matches_evaluation(tmp_path) -> None:  # noqa: ANN001
    """The scripted expert as a policy (it plans from obs/env_state): `protege eval`'s rollout and the
    runner on the HAL robot (simulated time) give the same success and reward stage per episode."""
    n, seed = 2, 20
    ev = evaluate(_OpenLoopExpert("transfer_cube"), lambda i: make_env("aloha_transfer_cube"), n_episodes=n, n_envs=1,
                  seed=seed, progress=False, temporal_ensemble=None)
    task = make_hardware_task("aloha_transfer_cube", {})
    s = RunnerSettings(rate_hz=50, n_episodes=n, seed=seed, stop_on_success=False, temporal_ensemble=None,
                       inference="thread", out_dir=str(tmp_path / "run"))
    run = Runner(_OpenLoopExpert("transfer_cube"), AlohaRobot(scene="transfer_cube"), task.action_space,
                 task.state_keys, None, task, s).run()
    assert run["status"] == "completed", run["message"]
    assert [(e["success"], e["max_stage"]) for e in run["episodes"]] == [(e["success"], e["max_stage"]) for e in ev["episodes"]]
    assert run["success_rate"] == ev["success_rate"] == 1.0
    assert run["safety_interventions"] == {}
    buf = ReplayBuffer.open(tmp_path / "run" / "recording.zarr")
    assert buf["action"].shape[1:] == (14,) and buf["robot/joint_pos"].shape[1:] == (12,)
    assert buf["robot/gripper"].shape[1:] == (2,) and buf["command/gripper"].shape[1:] == (2,)
    assert buf["obs/state"].shape[1:] == (14,) and buf["obs/env_state"].shape[1:] == (7,)


@pytest.mark.slow
def test_act_checkpoint_protege_run_matches_protege_eval(tmp_path) -> None:  # noqa: ANN001
    """A tiny ACT trained on transfer-cube (state: joints + object pose), then `protege eval` and
    `protege run hardware=aloha_mujoco` on the same seeds: the same success and reward stage per episode.
    Both run batch-1 inference (eval.n_envs=1): batched inference rounds differently."""
    import json
    import subprocess
    import sys

    from protege.training.trainer import train
    from tests.helpers import train_config

    cfg = train_config(tmp_path, "task=aloha_transfer_cube_state", "policy=act", "policy.hidden_dim=64", "policy.n_heads=4",
                       "policy.dim_feedforward=256", "policy.n_encoder_layers=2", "policy.n_vae_encoder_layers=1",
                       "train.steps=400", "train.batch_size=16", "train.lr=3e-4", "task.n_demos=8", "eval.n_episodes=0")
    result = train(cfg, progress=False)
    n, run_dir = 6, result["run_dir"]
    ev = subprocess.run([sys.executable, "-m", "protege.cli", "eval", f"checkpoint={run_dir}", f"eval.n_episodes={n}",
                         "eval.n_envs=1", "eval.video=false"], capture_output=True, text=True, timeout=900)
    assert ev.returncode == 0, ev.stderr
    ev_json = json.loads((tmp_path / "run" / "eval.json").read_text())
    out = tmp_path / "hal"
    run = subprocess.run([sys.executable, "-m", "protege.cli", "run", f"checkpoint={run_dir}", "hardware=aloha_mujoco",
                          f"runner.n_episodes={n}", "runner.stop_on_success=false", f"runner.out_dir={out}"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    rep = json.loads((out / "runner.json").read_text())
    pairs = [(e["success"], e["max_stage"]) for e in rep["episodes"]]
    assert pairs == [(e["success"], e["max_stage"]) for e in ev_json["episodes"]], (pairs, ev_json["episodes"])
    assert rep["success_rate"] == ev_json["success_rate"]
    assert max(s for _, s in pairs) >= 1  # the policy learned to reach the cube at least: the comparison has content
