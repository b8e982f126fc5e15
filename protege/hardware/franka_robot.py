"""Real Franka backend over the official `pylibfranka` bindings (libfranka 0.21).

Why pylibfranka and not franky-control: we need to own the 1 kHz loop (interpolate between policy
targets that arrive at 10-50 Hz, keep the commanded motion continuous, recover from reflexes), and
pylibfranka exposes exactly that (`start_joint_position_control` -> `readOnce`/`writeOnce`), while
franky's strength is its own motion generators (Ruckig trajectories), which would sit between our
safety layer and the robot. pylibfranka is Franka's own, versioned with libfranka.

The 1 kHz loop runs in its own thread (SCHED_FIFO priority 80 when allowed, above the runner's
loop); the runner only swaps in a new target (under a lock), so the
loop never waits for policy inference (which runs in another process by default). Each cycle the
target is interpolated linearly over the measured command interval (robot time), then passed through
a rate limiter (velocity <= 90 % of the limit, acceleration-limited, braking distance respected) so
the commanded joint motion stays continuous as libfranka requires. Reflex / control errors are
recovered automatically (`automatic_error_recovery`, at most `max_recoveries` times); a network error
ends the loop and the next `read()`/`command()` raises `RobotError`. `stop()` brakes to rest,
finishes the motion and joins the thread. The gripper moves in a thread of its own (its commands block).

Joint coordinates: the kinematic model (`panda.py`, the Kitchen Panda MJCF) rotates joint 6 by
pi/2 with respect to Franka's convention, so this backend reports and accepts joints in the model's
coordinates (q_model = q_franka + JOINT_OFFSET) and converts on the wire; IK, limits and recordings
use one convention everywhere.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from protege.errors import ConfigError
from protege.hardware.base import JointCommand, Limits, MonotonicClock, Observation, RobotError
from protege.hardware.cameras import CameraError, CameraSet
from protege.hardware.panda import ACC_LIMITS, VEL_LIMITS, PandaKinematics

log = logging.getLogger("protege.hardware.franka")

JOINT_OFFSET = np.array([0.0, 0.0, 0.0, 0.0, 0.0, -np.pi / 2, 0.0])
# joint limits in Franka's convention (datasheets), intersected with the model's
FRANKA_LIMITS = {
    "panda": (np.array([-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973]),
              np.array([2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973])),
    "fr3": (np.array([-2.7437, -1.7837, -2.9007, -3.0421, -2.8065, 0.5445, -3.0159]),
            np.array([2.7437, 1.7837, 2.9007, -0.1518, 2.8065, 4.5169, 3.0159])),
}


# shared-memory layout (float64): state written by the loop, goal written by the runner, diagnostics
_T, _Q, _DQ, _GOAL, _SEQ = 0, slice(1, 8), slice(8, 15), slice(15, 22), 22
_CYCLES, _MAXGAP, _LATE, _COMM, _RECOV, _MINSUCC, _STOPPING, _FINISHED = range(23, 31)
_SHM_SIZE = 31


class FrankaRobot:
    def __init__(
        self,
        hostname: str = "172.16.0.2",
        name: str = "franka",
        model: str = "fr3",
        gripper: bool = True,
        realtime_config: str = "enforce",
        cameras: Mapping[str, Any] | tuple[str, ...] | list[str] = (),
        image_size: int | list[int] = 96,
        limits: dict[str, Any] | None = None,
        max_recoveries: int = 3,
        gripper_speed: float = 0.1,
        connect_timeout: float = 30.0,
        rt_priority: int = 80,
    ) -> None:
        if cameras and not isinstance(cameras, Mapping):
            raise ConfigError(f"franka robot: the policy needs camera(s) {list(cameras)}; say which device each one is "
                              "in hardware.cameras (name -> {backend: opencv|realsense|replay, <options>})")
        if model not in FRANKA_LIMITS:
            raise ConfigError(f"franka robot: model must be one of {sorted(FRANKA_LIMITS)}, got {model!r}")
        if realtime_config not in ("enforce", "ignore"):
            raise ConfigError(f"franka robot: realtime_config must be 'enforce' or 'ignore', got {realtime_config!r}")
        self.hostname, self.name, self.model, self.use_gripper = hostname, name, model, gripper
        self.realtime_config, self.max_recoveries, self.gripper_speed = realtime_config, max_recoveries, gripper_speed
        self.connect_timeout, self.rt_priority = connect_timeout, rt_priority
        self.kinematics = PandaKinematics()
        lo, hi = FRANKA_LIMITS[model]
        lower = np.maximum(lo + JOINT_OFFSET, self.kinematics.lower)
        upper = np.minimum(hi + JOINT_OFFSET, self.kinematics.upper)
        self.limits = Limits.panda(lower, upper, **(limits or {}))
        self.clock = MonotonicClock()
        self.camera_set = CameraSet(cameras or {})  # started in connect(), after the arm
        self.cameras = self.camera_set.names()
        self._proc: Any = None
        self._gripper_proc: Any = None
        self.stopped = False

    # ------------------------------------------------------------------------------------ protocol
    def connect(self) -> None:
        import importlib.util
        import multiprocessing as mp

        if importlib.util.find_spec("pylibfranka") is None:
            raise ConfigError("the Franka backend needs pylibfranka (pip install pylibfranka)")
        ctx = mp.get_context("spawn")
        self._shm = ctx.Array("d", _SHM_SIZE, lock=False)
        self._lock = ctx.Lock()
        self._err = ctx.Array("c", 1024, lock=False)
        self._shm[_MINSUCC] = 1.0
        self._seq = 0
        self.stopped = False
        self._proc = ctx.Process(target=_control_process, name="franka-1khz", daemon=True, args=(
            self.hostname, self.realtime_config, self.max_recoveries, self.rt_priority,
            self.limits.joint_lower, self.limits.joint_upper, self._shm, self._lock, self._err))
        self._proc.start()
        t0 = time.monotonic()
        while self._shm[_CYCLES] == 0 and not self._shm[_FINISHED] and time.monotonic() - t0 < self.connect_timeout:
            time.sleep(0.005)
        if self._shm[_CYCLES] == 0:
            err = self._error() or f"no robot state within {self.connect_timeout:g} s"
            self._kill()
            raise RobotError(f"{self.name}: cannot connect to {self.hostname}: {err}")
        self._gripper_width = 0.0
        try:
            if self.use_gripper:
                self._start_gripper()
            self.camera_set.attach(self.clock.now)
            self.camera_set.start()  # a missing camera fails here, before the first command
        except (RobotError, CameraError):
            self.stop()
            raise

    def read(self) -> Observation:
        self._check()
        if self._gripper_proc is not None:
            self._gripper_poll()
        with self._lock:
            t, q, dq = self._shm[_T], np.array(self._shm[_Q]), np.array(self._shm[_DQ])
        pos, quat = self.kinematics.fk(q)
        images, stamps = self.camera_set.read()
        return Observation(t=t, joint_pos=q, joint_vel=dq, ee_pos=pos, ee_quat=quat, gripper=np.array([self._gripper_width]),
                           images=images, image_t=stamps)

    def command(self, cmd: JointCommand) -> None:
        self._check()
        if self.stopped:
            raise RobotError(f"{self.name}: command after stop(); reconnect first")
        self._seq += 1
        with self._lock:
            self._shm[_GOAL] = np.asarray(cmd.q, float).tolist()
            self._shm[_SEQ] = self._seq
        sent = self._gripper_sent if self._gripper_proc is not None else None
        if self._gripper_proc is not None and (sent is None or abs(cmd.gripper - sent) > 2e-3):
            self._gripper_requests.put(float(cmd.gripper))  # moves > 2 mm only: each move blocks the gripper
            self._gripper_sent = float(cmd.gripper)

    def stop(self) -> None:
        """Brake to rest, finish the motion, end the loop. Safe to call twice or after a lost connection."""
        if self._proc is None:
            return
        self._shm[_STOPPING] = 1.0
        self._proc.join(timeout=5.0)
        self._kill()
        if self._gripper_proc is not None:
            self._gripper_requests.put(None)
            self._gripper_proc.join(timeout=2.0)
            if self._gripper_proc.is_alive():
                self._gripper_proc.kill()
            self._gripper_proc = None
        self.camera_set.stop()  # the run is over; connect() starts them again
        self.stopped = True

    def close(self) -> None:
        self.stop()
        self.camera_set.stop()

    def diagnostics(self) -> dict[str, Any]:
        if self._proc is None and not hasattr(self, "_shm"):
            return {}
        s = self._shm
        return {"cycles": int(s[_CYCLES]), "max_cycle_gap_ms": float(s[_MAXGAP]), "late_cycles": int(s[_LATE]),
                "comm_errors": int(s[_COMM]), "recoveries": int(s[_RECOV]), "min_command_success_rate": float(s[_MINSUCC]),
                "error": self._error()}

    # ------------------------------------------------------------------------------------ internals
    def _error(self) -> str | None:
        return self._err.value.decode(errors="replace") or None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=2.0)
        self._proc = None

    def _check(self) -> None:
        if not hasattr(self, "_shm"):
            raise RobotError(f"{self.name}: not connected (call connect() first)")
        err = self._error()
        if err is not None:
            raise RobotError(f"{self.name}: {err}")
        if not self.stopped and (self._proc is None or not self._proc.is_alive()):
            code = None if self._proc is None else self._proc.exitcode
            raise RobotError(f"{self.name}: the 1 kHz control process died (exit code {code})")

    def _start_gripper(self) -> None:
        """The gripper client lives in its own process too: pylibfranka's blocking `Gripper.move` holds
        the GIL for the whole move (with the loop in a thread of this process: 470 ms gaps measured)."""
        import multiprocessing as mp
        import queue

        ctx = mp.get_context("spawn")
        self._gripper_requests, self._gripper_replies = ctx.Queue(), ctx.Queue()
        self._gripper_proc = ctx.Process(target=_gripper_server, name="franka-gripper", daemon=True,
                                         args=(self.hostname, self.gripper_speed, self.limits.gripper_max,
                                               self._gripper_requests, self._gripper_replies))
        self._gripper_proc.start()
        width: Any = "no answer within 30 s"
        for _ in range(60):
            try:
                width = self._gripper_replies.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._gripper_proc.is_alive():
                    width = f"gripper process died (exit code {self._gripper_proc.exitcode})"
                    break
        if isinstance(width, str):
            raise RobotError(f"{self.name}: gripper at {self.hostname}: {width}")
        self._gripper_width = width
        self._gripper_sent: float | None = None

    def _gripper_poll(self) -> None:
        """Collect the gripper process's replies (polled from `read()`, no thread needed)."""
        import queue

        while True:
            try:
                reply = self._gripper_replies.get_nowait()
            except queue.Empty:
                return
            if isinstance(reply, str):
                log.warning("%s: gripper: %s", self.name, reply)  # a failed move is not fatal for the arm
            else:
                self._gripper_width = reply


def _interpolate(q_cmd: np.ndarray, v_cmd: np.ndarray, desired: np.ndarray, dt: float, braking: bool,
                 lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One cycle toward `desired` (None: hold): velocity <= 90 % of the limit, acceleration-limited,
    never faster than it can still brake within the remaining distance."""
    vmax, amax = 0.9 * VEL_LIMITS, 0.9 * ACC_LIMITS
    if braking:
        v_want = np.zeros(7)
    else:
        err = desired - q_cmd
        v_brake = np.sqrt(2 * amax * np.abs(err))
        v_want = np.clip(err / dt, -v_brake, v_brake)
    v = np.clip(np.clip(v_want, v_cmd - amax * dt, v_cmd + amax * dt), -vmax, vmax)
    return np.clip(q_cmd + v * dt, lower, upper), v


def _control_process(hostname: str, realtime_config: str, max_recoveries: int, rt_priority: int,
                     lower: np.ndarray, upper: np.ndarray, shm: Any, lock: Any, err: Any) -> None:
    """The 1 kHz loop (its own process): read state, interpolate toward the newest goal, write."""
    import signal

    import pylibfranka as pf

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the runner, which calls stop()

    def fail(msg: str) -> None:
        err.value = msg.encode()[:1000]
        shm[_FINISHED] = 1.0

    if rt_priority > 0 and hasattr(os, "sched_setscheduler"):
        try:  # above the runner's loop (50)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(rt_priority))
        except OSError:
            pass  # no privilege: runs at normal priority
    try:
        rt = pf.RealtimeConfig.kEnforce if realtime_config == "enforce" else pf.RealtimeConfig.kIgnore
        robot = pf.Robot(hostname, rt)
        state = robot.read_once()
    except Exception as e:  # noqa: BLE001 - NetworkException, IncompatibleVersion, ...
        fail(f"{type(e).__name__}: {e}")
        return
    q_cmd, v_cmd = np.asarray(state.q) + JOINT_OFFSET, np.zeros(7)
    seq, robot_time, recoveries = 0.0, 0.0, 0
    target = None  # (q_start, q_goal, t_start, duration)
    last_cmd_time = None
    while True:
        try:
            ctrl = robot.start_joint_position_control(pf.ControllerMode.JointImpedance)
            first = True
            while True:
                state, duration = ctrl.readOnce()
                dt = duration.to_sec()
                robot_time += dt
                q = np.asarray(state.q) + JOINT_OFFSET
                with lock:
                    shm[_T] = robot_time
                    shm[_Q] = q.tolist()
                    shm[_DQ] = list(state.dq)
                    new_seq, goal = shm[_SEQ], np.array(shm[_GOAL])
                braking = shm[_STOPPING] > 0
                if new_seq != seq and not braking:  # a new policy target: interpolate over the command interval
                    dur = 0.1 if last_cmd_time is None else float(np.clip(robot_time - last_cmd_time, 0.01, 0.2))
                    target, seq, last_cmd_time = (q_cmd.copy(), goal, robot_time, dur), new_seq, robot_time
                if target is None:
                    desired = q_cmd
                else:
                    q0, q1, t0, dur = target
                    desired = q0 + min(1.0, max(0.0, (robot_time - t0) / dur)) * (q1 - q0)
                q_cmd, v_cmd = _interpolate(q_cmd, v_cmd, desired, dt if dt > 0 else 1e-3, braking, lower, upper)
                shm[_CYCLES] += 1
                if not first:  # the first read of a control session reports the time since the last one
                    shm[_MAXGAP] = max(shm[_MAXGAP], dt * 1e3)
                    shm[_LATE] += dt > 1.5e-3
                first = False
                shm[_MINSUCC] = min(shm[_MINSUCC], float(state.control_command_success_rate))
                cmd = pf.JointPositions((q_cmd - JOINT_OFFSET).tolist())
                done = braking and bool(np.all(np.abs(v_cmd) < 1e-4))
                if done:
                    cmd.motion_finished = True
                ctrl.writeOnce(cmd)
                if done:
                    try:
                        robot.stop()
                    except Exception:  # noqa: BLE001, S110 - the motion already finished
                        pass
                    shm[_FINISHED] = 1.0
                    return
        except pf.ControlException as e:  # a reflex: recover and resume from where the arm is
            shm[_RECOV] += 1
            if shm[_STOPPING] > 0 or recoveries >= max_recoveries:
                fail(f"control error (after {recoveries} recoveries): {e}")
                return
            recoveries += 1
            try:
                robot.automatic_error_recovery()
                state = robot.read_once()
            except Exception as e2:  # noqa: BLE001
                fail(f"error recovery failed: {e2}")
                return
            q_cmd, v_cmd, target = np.asarray(state.q) + JOINT_OFFSET, np.zeros(7), None
        except Exception as e:  # noqa: BLE001 - NetworkException and anything else: the connection is gone
            shm[_COMM] += 1
            fail(f"connection lost: {type(e).__name__}: {e}")
            return


def _gripper_server(hostname: str, speed: float, max_width: float, requests: Any, replies: Any) -> None:
    """Gripper process: move to each requested width (the newest one wins), reply with the width."""
    import queue
    import signal

    import pylibfranka as pf

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the runner, which stops everything
    try:
        gripper = pf.Gripper(hostname)
        replies.put(float(gripper.read_once().width))
    except Exception as e:  # noqa: BLE001
        replies.put(f"cannot connect: {e}")
        return
    while True:
        width = requests.get()
        try:
            while True:  # skip to the newest target
                width = requests.get_nowait()
        except queue.Empty:
            pass
        if width is None:
            return
        try:
            gripper.move(float(np.clip(width, 0.0, max_width)), speed)
            replies.put(float(gripper.read_once().width))
        except Exception as e:  # noqa: BLE001
            replies.put(f"move to {width:.3f} m failed: {e}")
