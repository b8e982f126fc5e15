"""Hardware layer, Franka sim tasks and the real-time runner: safety, fault injection, agreement with
gymnasium evaluation. Faults are injected into a real MuJoCo robot in real time; each must end with
the robot stopped, the recording intact and a status / exit code that says what happened."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

# diffusers (-> triton) must be imported before mujoco: with MUJOCO_GL=osmesa the reverse order
# segfaults in this environment (triton's and OSMesa's LLVMs in one process)
import protege.policies.diffusion  # noqa: F401
from protege.datasets.replay_buffer import ReplayBuffer
from protege.envs import make_env, make_expert
from protege.envs.collect import run_expert_episode
from protege.hardware.base import (Controller, EEDeltaSpace, JointCommand, JointPositionSpace, RobotError, SafetyLayer)
from protege.hardware.mujoco_robot import MujocoRobot
from protege.policies.base import Policy
from protege.runtime.runner import EXIT_CODES, Runner, RunnerSettings


class GoalPolicy(Policy):
    """A hand-written proportional controller behind the Policy interface (state = [ee_pos, goal]),
    with injectable faults: raise on call `raise_at`, sleep `delay` s from call `delay_from`, output
    NaN, or scale its steps by `gain` (beyond the limits)."""

    def __init__(self, n_action_steps: int = 4, raise_at: int | None = None, delay: float = 0.0, delay_from: int = 1,
                 nan: bool = False, gain: float = 1.0, absolute: bool = False) -> None:
        meta = {"obs/state": {"shape": [6], "kind": "state"}, "action": {"shape": [4], "kind": "action"}}
        super().__init__(meta, n_obs_steps=2, horizon=n_action_steps + 1, n_action_steps=n_action_steps)
        self.dummy = torch.nn.Linear(1, 1)  # a parameter, so `policy.device` works
        self.raise_at, self.delay, self.delay_from, self.nan, self.gain = raise_at, delay, delay_from, nan, gain
        self.absolute = absolute  # actions: planned positions (ee_pose) instead of steps (ee_delta)
        self.calls = 0

    def predict_action(self, obs):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.raise_at is not None and self.calls >= self.raise_at:
            raise ValueError("injected policy failure")
        if self.delay and self.calls >= self.delay_from:
            time.sleep(self.delay)
        s = obs["obs/state"][:, -1].double()
        pos, goal, chunk = s[:, 0:3], s[:, 3:6], []
        for _ in range(self.n_action_steps):  # a plan: steps of at most 3 cm that stop at the goal
            step = torch.clamp(goal - pos, -0.03, 0.03) * self.gain
            pos = pos + step
            chunk.append(torch.cat([pos if self.absolute else step, torch.full_like(step[:, :1], 0.08)], -1))
        a = torch.stack(chunk, 1).float()
        if self.nan:
            a[:] = float("nan")
        return a


def make_runner(tmp_path, policy, robot=None, action_space="ee_delta", **settings):  # noqa: ANN001, ANN201
    from protege.envs.franka import make_task

    robot = robot or MujocoRobot(realtime=True)
    s = RunnerSettings(rate_hz=20, n_episodes=1, max_steps=30, watchdog_timeout=0.3, stop_on_success=False,
                       out_dir=str(tmp_path / "run"), temporal_ensemble=None, inference="thread")
    for k, v in settings.items():
        setattr(s, k, v)
    task = make_task("reach")
    return Runner(policy, robot, action_space, task.state_keys, [], task, s), robot


def recorded(tmp_path) -> ReplayBuffer:  # noqa: ANN001
    buf = ReplayBuffer.open(tmp_path / "run" / "recording.zarr")
    buf.validate_data()
    return buf


# ------------------------------------------------------------------------------------------ hardware
def test_ik_reaches_targets_in_workspace() -> None:
    from protege.hardware.panda import DOWN_QUAT, HOME_Q, PandaKinematics

    kin = PandaKinematics()
    rng = np.random.default_rng(0)
    for _ in range(20):
        target = rng.uniform([0.35, -0.3, 0.05], [0.7, 0.3, 0.45])
        q = kin.ik(target, DOWN_QUAT, HOME_Q, iters=100)
        pos, quat = kin.fk(q)
        assert np.linalg.norm(pos - target) < 2e-3
        assert abs(abs(quat @ DOWN_QUAT) - 1) < 1e-3


@pytest.mark.parametrize("control", ["position", "impedance"])
def test_mujoco_robot_tracks_commands(control: str) -> None:
    robot = MujocoRobot(realtime=False, control=control)
    robot.connect()
    obs = robot.read()
    ctl = Controller(robot.kinematics, EEDeltaSpace(), SafetyLayer(robot.limits, 0.1))
    goal = np.array([0.55, 0.15, 0.12])
    for _ in range(30):
        cmd, ok = ctl(np.r_[np.clip(goal - obs.ee_pos, -0.03, 0.03), 0.04], obs)
        robot.command(cmd)
        robot.clock.sleep_until(obs.t + 0.1)
        obs = robot.read()
    assert np.linalg.norm(obs.ee_pos - goal) < 0.01
    assert abs(obs.gripper[0] - 0.04) < 0.005
    assert obs.t == pytest.approx(3.0)
    robot.stop()
    with pytest.raises(RobotError, match="after stop"):
        robot.command(cmd)


def test_safety_layer_limits_and_counts() -> None:
    robot = MujocoRobot(realtime=False)
    robot.connect()
    obs = robot.read()
    L = robot.limits
    safety = SafetyLayer(L, 0.05)
    ctl = Controller(robot.kinematics, EEDeltaSpace(), safety)
    cmd, ok = ctl(np.array([np.nan, 0, 0, 0.08]), obs)
    assert not ok and np.allclose(cmd.q, obs.joint_pos) and safety.counts["non_finite_action"] == 1
    cmd, ok = ctl(np.array([0.0, 0.0, -5.0, 0.5]), obs)  # through the table, gripper too wide
    assert ok and safety.counts["workspace"] == 1 and safety.counts["max_ee_step"] == 1
    assert cmd.gripper == L.gripper_max and safety.counts["gripper_limit"] == 1
    assert np.all(np.abs(cmd.q - obs.joint_pos) <= L.joint_vel * 0.05 + 1e-9)
    jctl = Controller(robot.kinematics, JointPositionSpace(), SafetyLayer(L, 0.05))
    beyond = obs.joint_pos.copy()
    beyond[6] = 3.2  # the wrist joint's limit is 2.8973 rad (the end effector stays in the box)
    cmd, ok = jctl(np.r_[beyond, 0.04], obs)
    assert ok and jctl.safety.counts["joint_limit"] == 1 and cmd.q[6] <= L.joint_upper[6]
    beyond = obs.joint_pos.copy()
    beyond[3] = -0.5  # within joint 4's limits, but the arm stretches up out of the workspace box
    cmd, ok = jctl(np.r_[beyond, 0.04], obs)
    assert not ok and jctl.safety.counts["workspace"] == 1
    assert np.all(np.abs(cmd.q - obs.joint_pos) <= L.joint_vel * 0.05 + 1e-9)


def test_franka_experts_succeed() -> None:
    for task in ("reach", "push", "pick_place"):
        env = make_env("franka", task=task)
        expert = make_expert("franka", env)
        wins = [run_expert_episode(env, expert, seed)[1] for seed in range(5)]
        assert all(wins), (task, wins)


# ------------------------------------------------------------------------------------------- runner
def test_runner_completes_and_records(tmp_path) -> None:  # noqa: ANN001
    runner, robot = make_runner(tmp_path, GoalPolicy(), n_episodes=2, max_steps=50, stop_on_success=True)
    report = runner.run()
    assert report["status"] == "completed" and report["exit_code"] == 0
    assert report["success_rate"] == 1.0
    buf = recorded(tmp_path)
    assert buf.n_episodes == 2 and buf.n_steps == report["ticks"]
    assert {"obs/state", "action", "robot/joint_pos", "command/q", "runner/held"} <= set(buf.keys())
    assert report["period_ms_p50"] == pytest.approx(50, abs=5)
    assert robot.stopped
    assert (tmp_path / "run" / "runner.json").exists()


def test_policy_raises(tmp_path) -> None:  # noqa: ANN001
    runner, robot = make_runner(tmp_path, GoalPolicy(n_action_steps=2, raise_at=4))
    report = runner.run()
    assert report["status"] == "policy_error" and report["exit_code"] == EXIT_CODES["policy_error"] == 1
    assert "injected policy failure" in report["message"] and "ValueError" in report["message"]
    assert robot.stopped
    buf = recorded(tmp_path)
    assert buf.n_episodes == 1 and buf.n_steps == report["ticks"] >= 4


def test_slow_policy_holds_then_watchdog_stops(tmp_path) -> None:  # noqa: ANN001
    runner, robot = make_runner(tmp_path, GoalPolicy(n_action_steps=2, delay=1.0, delay_from=2))
    report = runner.run()
    assert report["status"] == "watchdog" and report["exit_code"] == 3
    assert "missed its deadline" in report["message"]
    assert report["deadline_misses"] >= 3
    assert robot.stopped
    buf = recorded(tmp_path)
    held = buf["runner/held"][: buf.n_steps]
    assert held.sum() == report["deadline_misses"] - 1  # every missed tick held; the last one ended the run
    q = buf["command/q"][: buf.n_steps]
    assert np.allclose(q[held.astype(bool)], q[held.astype(bool)][0])  # holding = the same joint targets


def test_slow_but_async_policy_keeps_up(tmp_path) -> None:  # noqa: ANN001
    """Inference takes 1.5 periods: the next chunk is requested early and its stale head dropped
    (absolute targets: a stale step of a time-indexed plan is safe to skip)."""
    policy = GoalPolicy(n_action_steps=8, delay=0.075, delay_from=2, absolute=True)
    runner, robot = make_runner(tmp_path, policy, action_space="ee_pose", max_steps=40)
    report = runner.run()
    assert report["status"] == "completed", report["message"]
    assert report["stale_actions_dropped"] > 0
    assert report["deadline_misses"] <= 2, report  # only the first request, before latency is measured, may miss
    obs = robot.read()
    assert np.linalg.norm(obs.ee_pos - obs.extra["goal_pos"]) < 0.03


def test_no_chunk_crosses_into_the_next_episode(tmp_path) -> None:  # noqa: ANN001
    """An episode that ends on success with a request in flight: that chunk was computed from the old
    scene and must be discarded, not executed at the start of the next episode."""
    policy = GoalPolicy(n_action_steps=4, delay=0.06, delay_from=1)  # 1.2 periods: requests go out early
    runner, robot = make_runner(tmp_path, policy, n_episodes=3, max_steps=60, stop_on_success=True)
    added: list[tuple[int, int]] = []  # (loop step, the step the chunk was requested at)
    add = runner._add

    def spy(res, executor, step, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if res is not None:
            added.append((step, res[0]))
        return add(res, executor, step, *args, **kwargs)

    runner._add = spy
    report = runner.run()
    assert report["status"] == "completed", report["message"]
    # a chunk requested at a later step than the loop is at can only come from the previous episode
    assert all(start <= step for step, start in added), added
    assert sum(step == 0 for step, _ in added) >= 3  # each episode starts from its own first chunk
    assert report["first_chunk_ms_max"] >= 60 and report["n_inferences"] > 0


def test_nan_action_rejected_then_stopped(tmp_path) -> None:  # noqa: ANN001
    runner, robot = make_runner(tmp_path, GoalPolicy(nan=True))
    report = runner.run()
    assert report["status"] == "watchdog" and report["exit_code"] == 3
    assert "non_finite_action" in report["message"]
    assert report["safety_interventions"]["non_finite_action"] >= 5
    assert robot.stopped
    buf = recorded(tmp_path)
    assert np.isfinite(buf["action"][:]).all() and buf["runner/held"][: buf.n_steps].all()


def test_actions_beyond_limits_are_clipped(tmp_path) -> None:  # noqa: ANN001
    runner, robot = make_runner(tmp_path, GoalPolicy(gain=40.0), max_steps=25)
    report = runner.run()
    assert report["status"] == "completed"
    assert report["safety_interventions"].get("max_ee_step", 0) > 0
    buf = recorded(tmp_path)
    ee = buf["robot/ee_pos"][: buf.n_steps]
    L = robot.limits
    assert np.all(ee >= L.workspace_lower - 0.01) and np.all(ee <= L.workspace_upper + 0.01)
    steps = np.abs(np.diff(buf["command/q"][: buf.n_steps], axis=0))
    assert np.all(steps <= L.joint_vel / 20 + 1e-6)


class FlakyRobot(MujocoRobot):
    """Drops camera frames from read `drop_from` on, or loses the connection at read `lose_at`."""

    def __init__(self, drop_from: int | None = None, lose_at: int | None = None, **kw) -> None:  # noqa: ANN003
        super().__init__(**kw)
        self.drop_from, self.lose_at, self.reads = drop_from, lose_at, 0

    def read(self):  # noqa: ANN201
        self.reads += 1
        if self.lose_at is not None and self.reads >= self.lose_at:
            raise RobotError("connection lost (injected)")
        obs = super().read()
        if self.drop_from is not None and self.reads >= self.drop_from:
            obs.images = {c: None for c in obs.images}
        return obs


def test_missing_camera_frames_hold_then_stop(tmp_path) -> None:  # noqa: ANN001
    robot = FlakyRobot(drop_from=6, realtime=True, cameras=("front",), image_size=32)
    try:
        robot.connect()
        robot.render("front")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no offscreen renderer here: {e}")
    from protege.envs.franka import make_task

    # frames missing, not late: a generous max_frame_age (rendering is slow on a loaded machine; see test_cameras.py)
    s = RunnerSettings(rate_hz=10, max_steps=30, watchdog_timeout=0.3, stop_on_success=False,
                       out_dir=str(tmp_path / "run"), temporal_ensemble=None, inference="thread", max_frame_age=5.0)
    runner = Runner(GoalPolicy(n_action_steps=2), robot, "ee_delta", make_task("reach").state_keys, ["front"],
                    make_task("reach"), s)
    report = runner.run()
    assert report["status"] == "watchdog" and "camera frames missing" in report["message"]
    assert report["safety_interventions"]["missing_camera_frame"] >= 3
    assert robot.stopped
    buf = recorded(tmp_path)
    assert buf["obs/front"].shape[1:] == (32, 32, 3) and buf.n_steps == report["ticks"]
    robot.close()


def test_connection_lost(tmp_path) -> None:  # noqa: ANN001
    runner, robot = make_runner(tmp_path, GoalPolicy(), robot=FlakyRobot(lose_at=8, realtime=True))
    report = runner.run()
    assert report["status"] == "robot_error" and report["exit_code"] == 4
    assert "connection lost" in report["message"]
    assert robot.stopped
    assert recorded(tmp_path).n_steps == report["ticks"] == 6  # reads 1 and 2 start the episode and tick 0


def test_sigint_stops_safely(tmp_path) -> None:  # noqa: ANN001
    runner, robot = make_runner(tmp_path, GoalPolicy(), max_steps=200)

    def interrupt_once_running() -> None:  # after a few ticks, however slow the start-up on a loaded machine
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and getattr(getattr(runner, "stats", None), "ticks", 0) < 5:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    report = runner.run()
    assert report["status"] == "SIGINT" and report["exit_code"] == 130
    assert "SIGINT" in report["message"]
    assert robot.stopped and 3 <= report["ticks"] < 200
    assert recorded(tmp_path).n_steps == report["ticks"]


def test_programmatic_estop(tmp_path) -> None:  # noqa: ANN001
    runner, robot = make_runner(tmp_path, GoalPolicy(), max_steps=200)
    threading.Timer(0.3, runner.estop.trigger, args=("operator pressed stop",)).start()
    report = runner.run()
    assert report["status"] == "estop" and report["exit_code"] == 5
    assert "operator pressed stop" in report["message"] and robot.stopped


# ---------------------------------------------------------------------------- trained policy, CLI
@pytest.fixture(scope="module")
def reach_bc(tmp_path_factory):  # noqa: ANN001, ANN201
    from protege.training.trainer import train
    from tests.helpers import train_config

    tmp = tmp_path_factory.mktemp("reach_bc")
    cfg = train_config(tmp, "task=franka_reach", "policy=bc", "train.steps=400", "task.n_demos=30",
                       "policy.hidden_dims=[128,128]", "eval.n_episodes=10")
    result = train(cfg, progress=False)
    return result


def test_runner_agrees_with_gymnasium_eval(reach_bc, tmp_path) -> None:  # noqa: ANN001
    from protege.envs.franka import make_task
    from protege.training.checkpoint import load_policy

    ev = reach_bc["eval"]
    assert ev["success_rate"] >= 0.7  # the tiny BC learned the task
    policy = load_policy(reach_bc["checkpoint"])
    task = make_task("reach")
    n = ev["n_episodes"]
    # simulated time: the same steps as evaluation, so the same outcome episode by episode
    s = RunnerSettings(rate_hz=10, n_episodes=n, max_steps=40, seed=100_000, out_dir=str(tmp_path / "fast"),
                       temporal_ensemble=None, inference="thread")
    fast = Runner(policy, MujocoRobot(realtime=False), "ee_delta", task.state_keys, [], task, s).run()
    assert [e["success"] for e in fast["episodes"]] == [e["success"] for e in ev["episodes"]]
    assert [e["length"] for e in fast["episodes"]] == [e["length"] for e in ev["episodes"]]
    # real time (wall-clock pacing, inference in the worker thread): the same success rate up to
    # timing noise (sim time between ticks follows the wall clock, not exactly 100 ms)
    s.out_dir = str(tmp_path / "rt")
    runner = Runner(policy, MujocoRobot(realtime=True), "ee_delta", task.state_keys, [], task, s)
    rt = runner.run()
    assert rt["status"] == "completed", rt["message"]
    # no deadline miss, unless the machine stalled an inference call: the loop waits inference_budget of a
    # period for a chunk requested at the tick that needs it (this MLP takes ~1 ms), so on a loaded machine
    # a call preempted for longer costs up to ceil(latency / period) + 1 ticks. Unstalled runs: exactly 0.
    budget = s.inference_budget / s.rate_hz
    stalled = [lat for lat in runner.stats.latency if lat > budget / 2]
    allowed = sum(int(np.ceil(lat * s.rate_hz)) + 1 for lat in stalled)
    assert rt["deadline_misses"] <= allowed, (rt["deadline_misses"], rt["miss_causes"], sorted(runner.stats.latency)[-5:])
    assert abs(rt["success_rate"] - ev["success_rate"]) <= 0.2, (rt["episodes"], ev["episodes"])


def test_cli_run(reach_bc, tmp_path) -> None:  # noqa: ANN001
    import subprocess
    import sys

    out = tmp_path / "cli"
    # the default runner config: inference in a spawned process, real-time pacing
    cmd = [sys.executable, "-m", "protege.cli", "run", f"checkpoint={reach_bc['run_dir']}", "hardware=mujoco",
           "runner.n_episodes=2", f"runner.out_dir={out}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "run: completed (exit 0)" in p.stdout and "success_rate" in p.stdout
    assert ReplayBuffer.open(out / "recording.zarr").n_episodes == 2
    bad = subprocess.run(cmd[:4] + ["hardware=nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown hardware 'nope'" in bad.stderr


def test_cli_run_ctrl_c(reach_bc, tmp_path) -> None:  # noqa: ANN001
    """A real SIGINT to `protege run`: the robot is stopped, the partial episode recorded, exit 130."""
    import subprocess
    import sys

    out = tmp_path / "cli_int"
    cmd = [sys.executable, "-m", "protege.cli", "run", f"checkpoint={reach_bc['run_dir']}", "hardware=mujoco",
           "runner.inference=thread", "runner.stop_on_success=false", "runner.max_steps=1000", f"runner.out_dir={out}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in p.stderr:  # wait until the loop runs
        if "Ctrl-C stops the robot" in line or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "run: SIGINT (exit 130): stopped by SIGINT" in stdout
    buf = ReplayBuffer.open(out / "recording.zarr")
    assert buf.n_episodes == 1 and 5 <= buf.n_steps < 1000


def test_run_refuses_a_checkpoint_observing_fields_the_robot_does_not_declare() -> None:
    from types import SimpleNamespace

    from protege.errors import ConfigError
    from protege.hardware.base import single_arm_features
    from protege.runtime.runner import check_state_fields

    arm = SimpleNamespace(name="franka", features=single_arm_features(7))
    check_state_fields(arm, ["ee_pos", "gripper", "arm"], "franka_reach")  # declared fields and the arm group
    with pytest.raises(ConfigError, match=r"franka_reach.*\['goal_pos'\].*'franka'"):
        check_state_fields(arm, {"obs/state": ["ee_pos", "goal_pos"]}, "franka_reach")
