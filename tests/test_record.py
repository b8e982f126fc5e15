"""`protege record`: teleoperated demonstrations into a replay buffer. The replay device plays expert
demos' actions through the MuJoCo robot, the safety layer and the recorder; the recorded buffer
reproduces the demos and trains a policy. The keyboard device is driven through a real pseudo-terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import protege.policies.diffusion  # noqa: F401  (diffusers before mujoco, see test_runtime.py)
from protege.datasets.replay_buffer import ReplayBuffer
from protege.envs.collect import collect
from protege.runtime.teleop import KeyboardTeleop, TeleopError


@pytest.fixture(scope="module")
def reach_demos(tmp_path_factory):  # noqa: ANN001, ANN201
    out = tmp_path_factory.mktemp("demos") / "reach.zarr"
    collect("franka", {"task": "reach"}, 20, str(out), fps=10, progress=False)
    return out


def test_record_replay_reproduces_demos_and_trains(reach_demos, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "rec.zarr"
    cmd = [sys.executable, "-m", "protege.cli", "record", "hardware=mujoco_fast", "teleop=replay",
           f"teleop.path={reach_demos}", "task=franka_reach", f"out={out}", "seed=0", "instruction=reach the green dot"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "20 episode(s) saved" in p.stdout
    rec, demo = ReplayBuffer.open(out), ReplayBuffer.open(reach_demos)
    rec.validate_data()
    assert rec.n_episodes == demo.n_episodes and rec.n_steps == demo.n_steps
    # the same seeds and actions through the same robot, controller and safety: the same observations
    np.testing.assert_allclose(rec["obs/state"][: rec.n_steps], demo["obs/state"][: demo.n_steps], atol=1e-5)
    np.testing.assert_array_equal(rec["action"][: rec.n_steps], demo["action"][: demo.n_steps])
    assert {"robot/joint_pos", "robot/ee_pos", "robot/t", "command/q", "task"} <= set(rec.keys())
    assert rec.attrs["tasks"] == ["reach the green dot"] and rec.attrs["units"]["action"] == "ee_delta"
    # a crash-safe append: a second session adds episodes after the first ones
    p2 = subprocess.run([*cmd, "teleop.episodes=[0]"], capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stderr
    assert ReplayBuffer.open(out).n_episodes == 21


def test_record_refuses_fields_the_robot_does_not_declare(reach_demos, tmp_path) -> None:  # noqa: ANN001
    from protege.errors import ConfigError
    from protege.runtime.record import record_from_config
    from tests.helpers import compose

    cfg = compose("record", ["hardware=mujoco_fast", "teleop=replay", f"teleop.path={reach_demos}",
                             "state_keys=[ee_pos,no_such_field]", f"out={tmp_path / 'rec.zarr'}"])
    with pytest.raises(ConfigError, match=r"protege record: .*\['no_such_field'\]"):
        record_from_config(cfg)
    assert not (tmp_path / "rec.zarr").exists()  # refused before anything was written


@pytest.mark.slow
def test_recorded_buffer_trains_a_policy(tmp_path) -> None:  # noqa: ANN001
    from protege.runtime.record import record_from_config
    from protege.training.trainer import train
    from tests.helpers import compose, train_config

    demos, out = tmp_path / "demos.zarr", tmp_path / "rec.zarr"
    collect("franka", {"task": "reach"}, 40, str(demos), fps=10, progress=False)
    r = record_from_config(compose("record", ["hardware=mujoco_fast", "teleop=replay", f"teleop.path={demos}",
                                              "task=franka_reach", f"out={out}"]))
    assert r["saved"] == 40
    cfg = train_config(tmp_path, "task=franka_reach", "policy=bc", f"task.dataset={out}", "task.n_demos=40",
                       "train.steps=1000", "policy.hidden_dims=[128,128]", "eval.n_episodes=20")
    assert train(cfg, progress=False)["eval"]["success_rate"] >= 0.7


def test_keyboard_teleop_through_a_pseudo_terminal() -> None:
    master, slave = os.openpty()
    try:
        kb = KeyboardTeleop(step=0.01, fd=slave)
        kb.start()
        os.write(master, b" wwdg\n")
        time.sleep(0.3)
        inp = kb.read(recording=False)
        assert inp.events == ["start", "save"]
        np.testing.assert_allclose(inp.action, [0.02, -0.01, 0.0, 0.0])  # 2x forward, 1x right, gripper closed
        os.write(master, b"rq")
        time.sleep(0.3)
        inp = kb.read(recording=True)
        assert inp.events == ["quit"] and inp.action[2] == pytest.approx(0.01)
        kb.stop()
    finally:
        os.close(master)
        os.close(slave)
    with pytest.raises(TeleopError, match="needs a terminal"):
        r, w = os.pipe()
        try:
            KeyboardTeleop(fd=r).start()
        finally:
            os.close(r)
            os.close(w)


def test_spacemouse_without_a_device_is_a_clear_error() -> None:
    from protege.runtime.teleop import SpaceMouseTeleop

    with pytest.raises(TeleopError, match="spacemouse"):
        SpaceMouseTeleop().start()
