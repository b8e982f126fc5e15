"""The Franka backend (pylibfranka) against franky-sim, a simulator speaking the libfranka network
protocol, started as a separate process on a loopback address: the runner with scripted policies, a
lost connection, the gripper, and `protege run hardware=franka` on a camera-conditioned checkpoint
fed by a replay camera. franky-sim pulls MuJoCo 4, so it
lives in its own virtual environment: `$PROTEGE_FRANKY_SIM_VENV`, default
`~/.cache/protege/franky-sim-venv`, created by scripts/setup.sh or, when missing, by the fixture
here (one `pip install franky-sim`, a few minutes once). franky-sim runs slower than real time on 2
cores, so assertions are in robot time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import protege.policies.diffusion  # noqa: F401  (diffusers before mujoco, see test_runtime.py)
from protege.datasets.replay_buffer import ReplayBuffer
from protege.policies.base import Policy
from protege.runtime.runner import Runner, RunnerSettings

pytest.importorskip("pylibfranka")
FRANKY_SIM_VERSION = "1.0.4"


def franky_sim_venv() -> Path:
    return Path(os.environ.get("PROTEGE_FRANKY_SIM_VENV", Path.home() / ".cache/protege/franky-sim-venv"))


@pytest.fixture(scope="module")
def franky_sim_bin() -> Path:
    venv = franky_sim_venv()
    exe = venv / "bin" / "franky-sim"
    if not exe.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"franky-sim=={FRANKY_SIM_VERSION}"],
                           check=True, capture_output=True, timeout=1200)
        except (subprocess.SubprocessError, OSError) as e:
            out = getattr(e, "stderr", b"") or b""
            pytest.skip(f"could not create the franky-sim venv at {venv}: {e} {out.decode(errors='replace')[-500:]}")
    return exe


class FrankySim:
    def __init__(self, exe: Path, host: str) -> None:
        self.host = host
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"franky-sim-{host}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([str(exe), "-s", "mujoco", "--hostname", host], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"franky-sim exited with {self.proc.returncode}; see {self.log.name}")
            try:
                socket.create_connection((host, 1337), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"franky-sim did not listen on {host}:1337 within 120 s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def sim(franky_sim_bin: Path):  # noqa: ANN201
    host = f"127.0.{os.getpid() % 200 + 20}.{np.random.default_rng().integers(2, 250)}"
    s = FrankySim(franky_sim_bin, host)
    yield s
    s.kill()


class JointWavePolicy(Policy):
    """Joint-space test policy: a slow wave of joints 1 and 4 around the pose it first saw, as
    8-step chunks of absolute joint targets; `delay` s of 'inference' per call."""

    def __init__(self, delay: float = 0.0) -> None:
        meta = {"obs/state": {"shape": [7], "kind": "state"}, "action": {"shape": [8], "kind": "action"}}
        super().__init__(meta, n_obs_steps=1, horizon=8, n_action_steps=8)
        self.dummy = torch.nn.Linear(1, 1)
        self.delay, self.q0, self.calls = delay, None, 0

    def predict_action(self, obs):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.delay and self.calls > 1:
            time.sleep(self.delay)
        q = obs["obs/state"][0, -1].double()
        if self.q0 is None:
            self.q0, self.k = q.clone(), 0
        chunk = []
        for _ in range(8):
            self.k += 1
            target = self.q0.clone()
            target[0] += 0.15 * np.sin(self.k * 0.1)
            target[3] += 0.1 * np.sin(self.k * 0.1)
            chunk.append(torch.cat([target, torch.tensor([0.04], dtype=torch.float64)]))
        return torch.stack(chunk)[None].float()


def franka_runner(sim: FrankySim, tmp_path: Path, policy: Policy, steps: int, inference: str = "thread"):  # noqa: ANN201
    from protege.hardware.franka_robot import FrankaRobot

    robot = FrankaRobot(sim.host, realtime_config="ignore")
    s = RunnerSettings(rate_hz=10, max_steps=steps, watchdog_timeout=1.0, out_dir=str(tmp_path / "run"),
                       temporal_ensemble=None, inference=inference)
    return Runner(policy, robot, "joint_pos", ["joint_pos"], [], None, s), robot


def test_franka_runner_against_franky_sim(sim: FrankySim, tmp_path: Path) -> None:
    # inference takes 1.5 periods: the 1 kHz loop must not notice
    runner, robot = franka_runner(sim, tmp_path, JointWavePolicy(delay=0.15), steps=40, inference="process")
    report = runner.run()
    assert report["status"] == "completed", report["message"]
    d = report["robot_diagnostics"]
    assert d["comm_errors"] == 0 and d["error"] is None and d["min_command_success_rate"] == 1.0
    # robot time between two 1 kHz cycles: the loop (its own process) never waits for the 150 ms inference;
    # on this shared 2-core machine (CI runs the sim, the loop and inference on it) the OS may still delay
    # an occasional cycle by tens of ms. Idle real-time figures are bench_runtime.py's job, not a test's.
    assert d["late_cycles"] <= 0.01 * d["cycles"] and d["max_cycle_gap_ms"] < 100.0, d
    # the commanded 1 kHz stream (finite differences, as libfranka checks it) stays within FR3's limits
    assert 0 < d["max_jerk_ratio"] <= 1.0 and d["max_acceleration_ratio"] <= 1.0 and d["max_velocity_ratio"] <= 1.0, d
    assert d["interpolator_planner_retries"] <= 5, d
    print(f"\nfranky-sim: cycles={d['cycles']} late={d['late_cycles']} comm_errors={d['comm_errors']} "
          f"max_jerk={d['max_jerk']:.0f} (limit {d['jerk_limit']:.0f}) max_jerk_ratio={d['max_jerk_ratio']:.3f} "
          f"max_acc_ratio={d['max_acceleration_ratio']:.3f} max_vel_ratio={d['max_velocity_ratio']:.3f}")
    buf = ReplayBuffer.open(tmp_path / "run" / "recording.zarr")
    t = buf["robot/t"][: buf.n_steps]
    assert d["cycles"] >= 0.95 * t[-1] * 1000  # ~one cycle per robot millisecond
    # commands reach the simulated robot: joint 1 follows the commanded wave (amplitude 0.15 rad)
    q, cmd = buf["robot/joint_pos"][: buf.n_steps, 0], buf["command/q"][: buf.n_steps, 0]
    assert np.ptp(q) > 0.15
    # measured vs the previous tick's command: within about a tick of motion. franky-sim may run slower
    # than real time on a loaded machine: a tick then holds less robot time (robot/t), and the same
    # tracking delay in robot time spans more ticks, so the bounds scale with the measured slowdown
    slow = max(1.0, 0.1 / float(np.median(np.diff(t))))
    lag = np.abs(q[5:] - cmd[4:-1])
    step = np.median(np.abs(np.diff(cmd)))
    assert np.median(lag) < (2 * step + 0.005) * slow and lag.max() < 0.1 * slow, (np.median(lag), lag.max(), step, slow)
    corr = max(np.corrcoef(q[4 + k:], cmd[4:-k])[0, 1] for k in range(1, int(np.ceil(slow)) + 1))
    assert corr > 0.95, (corr, slow)
    assert robot.stopped


def test_franka_connection_lost(sim: FrankySim, tmp_path: Path) -> None:
    runner, robot = franka_runner(sim, tmp_path, JointWavePolicy(), steps=200)

    def kill_when_running() -> None:  # after 10 ticks, however long connecting took on this machine
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and getattr(getattr(runner, "stats", None), "ticks", 0) < 10:
            time.sleep(0.02)
        sim.kill()

    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    report = runner.run()
    killer.join(timeout=10)
    assert report["status"] == "robot_error" and report["exit_code"] == 4
    assert "connection lost" in report["message"] or "robot error" in report["message"]
    buf = ReplayBuffer.open(tmp_path / "run" / "recording.zarr")
    buf.validate_data()
    assert buf.n_steps == report["ticks"] >= 10
    assert robot.stopped


def test_franka_gripper_grasps_when_closing_and_releases_when_opening(sim: FrankySim) -> None:
    """A closing command is a force-controlled `grasp` (the Franka Hand holds what it closes on), an
    opening one a `move` (release); franky-sim runs both through the libfranka gripper protocol."""
    from protege.hardware.base import JointCommand
    from protege.hardware.franka_robot import FrankaRobot

    robot = FrankaRobot(sim.host, realtime_config="ignore", gripper_speed=0.2)
    robot.connect()
    try:
        q = robot.read().joint_pos

        def wait_for(key: str, n: int) -> dict:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                robot.read()
                d = robot.diagnostics()
                if d[key] >= n:
                    return d
                time.sleep(0.05)
            raise AssertionError(f"no {key} within 30 s: {robot.diagnostics()}")

        robot.command(JointCommand(q=q, gripper=0.0))  # close
        d = wait_for("gripper_grasps", 1)
        assert d["gripper_failed_grasps"] == 0 and d["gripper_grasped"] and d["gripper_releases"] == 0, d
        assert robot.read().gripper[0] < 0.01
        robot.command(JointCommand(q=q, gripper=0.001))  # jitter within the hysteresis: no new command
        robot.command(JointCommand(q=q, gripper=0.08))  # open
        d = wait_for("gripper_releases", 1)
        assert d["gripper_grasps"] == 1 and not d["gripper_grasped"], d
        assert robot.read().gripper[0] > 0.07
    finally:
        robot.stop()


# ------------------------------------------------------------------ camera-conditioned `protege run`
# franky-sim's start pose in the model's joint convention (franka_robot.JOINT_OFFSET), gripper width (m)
FRANKY_SIM_Q0 = np.array([0.0, 0.0, 0.0, -1.5708, 0.0, 0.0, 0.785])
FRANKY_SIM_GRIPPER = 0.04


@pytest.fixture(scope="module")
def camera_checkpoint(tmp_path_factory):  # noqa: ANN201
    """A tiny image BC (`idm_bc`: conv encoder from scratch + MLP head), a few training steps on joint-space
    demos around franky-sim's start pose with a `front` camera: obs/state = [joint_pos, gripper] (8),
    action = absolute joint targets + gripper width (8, `joint_pos`). Frame k of the buffer is a uniform
    image of value 2k, so a recorded frame tells which replayed frame the policy was given. Returns
    (run dir, buffer); the task is a recording's (no simulated scene, no gymnasium env: eval off)."""
    from omegaconf import open_dict

    from protege.datasets.frames import ImageStorage
    from protege.training.trainer import train
    from tests.helpers import train_config

    tmp = tmp_path_factory.mktemp("camera_bc")
    buf = ReplayBuffer.create(str(tmp / "front.zarr"), fps=10, image_storage=ImageStorage.parse("raw"))
    n, k = 60, 0
    for _ in range(2):
        phase = 0.1 * np.arange(k, k + n)
        q = np.repeat(FRANKY_SIM_Q0[None], n, 0)
        q[:, 0] += 0.05 * np.sin(phase)
        q[:, 3] += 0.05 * np.sin(phase)
        state = np.concatenate([q, np.full((n, 1), FRANKY_SIM_GRIPPER)], 1).astype(np.float32)
        action = np.concatenate([state[1:], state[-1:]])  # the next pose
        frames = np.zeros((n, 32, 32, 3), np.uint8) + (2 * np.arange(k, k + n, dtype=np.uint8))[:, None, None, None]
        buf.append_episode({"obs/state": state, "obs/front": frames, "action": action}, kinds={"obs/front": "image"})
        k += n
    cfg = train_config(tmp, "task=franka_reach", "policy=idm_bc", "policy.obs_encoder.freeze=false",
                       "policy.obs_encoder.conv_channels=[8]", "policy.obs_encoder.hidden_dims=[32]",
                       "policy.obs_encoder.out_dim=16", "policy.hidden_dims=[64]", "policy.horizon=8",
                       "policy.n_action_steps=4", "train.steps=20", "train.batch_size=16", "train.ema.enabled=false",
                       "eval.n_episodes=0", f"dataset={tmp / 'front.zarr'}")
    with open_dict(cfg):  # a robot's own recording: joint targets, no simulated scene or scripted expert
        cfg.task = {"name": "franka_front_camera", "env_id": None, "obs_keys": ["obs/state", "obs/front"], "fps": 10,
                    "n_demos": 0, "demo_seed": 0, "dataset": None,
                    "env": {"control_hz": 10, "action_space": "joint_pos", "max_episode_steps": 200}}
    result = train(cfg, progress=False)
    return Path(result["run_dir"]), tmp / "front.zarr"


def test_cli_run_camera_policy_against_franky_sim(sim: FrankySim, camera_checkpoint, tmp_path: Path) -> None:  # noqa: ANN001
    """`protege run hardware=franka` on a camera-conditioned checkpoint: the replay camera plays the
    buffer's `obs/front` at 20 fps into the policy (inference in its own process), the arm follows the
    1 kHz interpolated joint stream on franky-sim; the report has the frame ages and the Franka figures."""
    run_dir, frames = camera_checkpoint
    out, steps = tmp_path / "run", 40
    camera = f"{{backend: replay, path: '{frames}', key: obs/front, fps: 20}}"
    cmd = [sys.executable, "-m", "protege.cli", "run", f"checkpoint={run_dir}", "hardware=franka",
           f"hardware.hostname={sim.host}", "hardware.realtime_config=ignore", f"+hardware.cameras.front={camera}",
           "runner.state_keys=[joint_pos,gripper]", f"runner.max_steps={steps}", f"runner.out_dir={out}",
           # a loaded 2-core machine: room for spawning the 1 kHz process, and for an inference stall
           "+hardware.connect_timeout=120", "runner.watchdog_timeout=3"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "run: completed (exit 0)" in p.stdout and "camera frames: age p50/p99" in p.stdout
    report = json.loads((out / "runner.json").read_text())
    assert report["ticks"] == steps and report["n_inferences"] >= 3
    # frames reached the policy: every tick had one, recent (the loop never acted on a stale frame
    # beyond the odd stall of a loaded machine)
    assert report["missing_frames"] == 0 and report["stale_frames"] <= 0.1 * steps, report
    assert 0 <= report["frame_age_ms_p50"] <= 1e3 * 0.25, report
    d = report["robot_diagnostics"]
    assert d["comm_errors"] == 0 and d["error"] is None and d["min_command_success_rate"] == 1.0, d
    # ~one 1 kHz cycle per robot millisecond; with five processes on this 2-core machine the OS may delay an
    # occasional cycle by tens of ms (37 ms seen in CI), never a whole 100 ms control period
    assert d["late_cycles"] <= 0.01 * d["cycles"] and d["max_cycle_gap_ms"] < 100.0, d
    assert 0 < d["max_jerk_ratio"] <= 1.0 and d["max_acceleration_ratio"] <= 1.0 and d["max_velocity_ratio"] <= 1.0, d
    # the recording: the frames the policy observed, with their capture times (robot clock)
    buf = ReplayBuffer.open(out / "recording.zarr")
    buf.validate_data()
    n = buf.n_steps
    assert n == steps and buf["obs/front"].shape[1:] == (32, 32, 3) and buf["obs/state"].shape[1:] == (8,)
    t = buf["camera/front_t"][:n]
    assert np.isfinite(t).all() and np.all(np.diff(t) >= 0) and t[-1] - t[0] > 0.5 * steps / 10 * 0.5
    seen = np.round(buf["obs/front"][:n].reshape(n, -1).mean(1) / 2).astype(int)  # replayed frame index (JPEG ~ exact)
    assert len(np.unique(seen)) >= 10, seen  # fresh frames, not one frame over and over
    assert (np.diff(seen) >= 0).mean() >= 0.8, seen  # played forward (one wrap-around of the 120 frames at most)
    q = buf["robot/joint_pos"][:n]
    assert np.abs(q - FRANKY_SIM_Q0).max() < 0.3  # the arm stayed near the demonstrated poses
    print(f"\nfranky-sim camera run: ticks={report['ticks']} inferences={report['n_inferences']} "
          f"inference_ms_median={report['inference_ms_median']:.1f} frame_age_ms p50/p99="
          f"{report['frame_age_ms_p50']:.1f}/{report['frame_age_ms_p99']:.1f} stale_frames={report['stale_frames']} "
          f"distinct_frames={len(np.unique(seen))} cycles={d['cycles']} late={d['late_cycles']} "
          f"comm_errors={d['comm_errors']} max_jerk={d['max_jerk']:.0f} (limit {d['jerk_limit']:.0f}) "
          f"max_jerk_ratio={d['max_jerk_ratio']:.3f} max_acc_ratio={d['max_acceleration_ratio']:.3f} "
          f"max_vel_ratio={d['max_velocity_ratio']:.3f}")
