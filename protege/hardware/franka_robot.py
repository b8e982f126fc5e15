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
import threading
import time
from typing import Any

import numpy as np

from protege.errors import ConfigError
from protege.hardware.base import JointCommand, Limits, MonotonicClock, Observation, RobotError
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


class FrankaRobot:
    def __init__(
        self,
        hostname: str = "172.16.0.2",
        name: str = "franka",
        model: str = "fr3",
        gripper: bool = True,
        realtime_config: str = "enforce",
        cameras: tuple[str, ...] | list[str] = (),
        image_size: int = 96,
        limits: dict[str, Any] | None = None,
        max_recoveries: int = 3,
        gripper_speed: float = 0.1,
        connect_timeout: float = 5.0,
        rt_priority: int = 80,
    ) -> None:
        if cameras:
            raise ConfigError(f"franka robot: cameras {list(cameras)} requested, but this backend has no camera "
                              "drivers; attach them to the robot class or train a state-only policy")
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
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._robot: Any = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._error: str | None = None
        self._stopping = False
        self.stopped = False
        self._state: tuple | None = None  # (robot time s, q, dq) in model coordinates
        self._robot_time = 0.0
        self._target: tuple | None = None  # (q_start, q_goal, t_start, duration)
        self._last_cmd_time: float | None = None
        self._gripper_width = 0.0
        self._gripper_proc: Any = None
        self.diag = {"cycles": 0, "max_cycle_gap_ms": 0.0, "late_cycles": 0, "comm_errors": 0, "recoveries": 0,
                     "min_command_success_rate": 1.0}

    # ------------------------------------------------------------------------------------ protocol
    def connect(self) -> None:
        try:
            import pylibfranka as pf
        except ImportError as e:
            raise ConfigError("the Franka backend needs pylibfranka (pip install pylibfranka)") from e
        self._pf = pf
        self._reset_state()
        rt = pf.RealtimeConfig.kEnforce if self.realtime_config == "enforce" else pf.RealtimeConfig.kIgnore
        try:
            self._robot = pf.Robot(self.hostname, rt)
            state = self._robot.read_once()
        except Exception as e:  # noqa: BLE001 - libfranka raises NetworkException, IncompatibleVersion, ...
            raise RobotError(f"{self.name}: cannot connect to {self.hostname}: {e}") from e
        q = np.asarray(state.q) + JOINT_OFFSET
        self._q_cmd, self._v_cmd = q.copy(), np.zeros(7)
        self._state = (0.0, q, np.zeros(7))
        if self.use_gripper:
            self._start_gripper()
        self._thread = threading.Thread(target=self._control_loop, name="franka-1khz", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while self.diag["cycles"] == 0 and self._error is None and time.monotonic() - t0 < self.connect_timeout:
            time.sleep(0.001)
        if self._error is not None or self.diag["cycles"] == 0:
            raise RobotError(f"{self.name}: control loop did not start: {self._error or 'no state within timeout'}")

    def read(self) -> Observation:
        self._check()
        if self._gripper_proc is not None:
            self._gripper_poll()
        with self._lock:
            t, q, dq = self._state
            width = self._gripper_width
        pos, quat = self.kinematics.fk(q)
        return Observation(t=t, joint_pos=q.copy(), joint_vel=dq.copy(), ee_pos=pos, ee_quat=quat, gripper=np.array([width]))

    def command(self, cmd: JointCommand) -> None:
        self._check()
        if self.stopped or self._stopping:
            raise RobotError(f"{self.name}: command after stop(); reconnect first")
        with self._lock:
            now = self._robot_time
            # interpolate over the interval at which targets arrive (robot time), 10 ms .. 200 ms
            dur = 0.1 if self._last_cmd_time is None else float(np.clip(now - self._last_cmd_time, 0.01, 0.2))
            self._target = (self._q_cmd.copy(), np.asarray(cmd.q, float).copy(), now, dur)
            self._last_cmd_time = now
        sent = self._gripper_sent if self._gripper_proc is not None else None
        if self._gripper_proc is not None and (sent is None or abs(cmd.gripper - sent) > 2e-3):
            self._gripper_requests.put(float(cmd.gripper))  # moves > 2 mm only: each move blocks the gripper
            self._gripper_sent = float(cmd.gripper)

    def stop(self) -> None:
        """Brake to rest, finish the motion, join the loop. Safe to call twice or after a lost connection."""
        if self._thread is None:
            return
        self._stopping = True
        self._thread.join(timeout=3.0)
        self._thread = None
        if self._gripper_proc is not None:
            self._gripper_requests.put(None)
            self._gripper_proc.join(timeout=2.0)
            if self._gripper_proc.is_alive():
                self._gripper_proc.kill()
            self._gripper_proc = None
        self.stopped = True
        try:
            if self._robot is not None:
                self._robot.stop()
        except Exception as e:  # noqa: BLE001 - connection may be gone already
            log.warning("%s: robot.stop(): %s", self.name, e)

    def close(self) -> None:
        self.stop()
        self._robot = None

    def diagnostics(self) -> dict[str, Any]:
        return {**self.diag, "error": self._error}

    # ------------------------------------------------------------------------------------ internals
    def _check(self) -> None:
        if self._robot is None:
            raise RobotError(f"{self.name}: not connected (call connect() first)")
        if self._error is not None:
            raise RobotError(f"{self.name}: {self._error}")

    def _interpolate(self, dt: float, braking: bool) -> None:
        """Advance the commanded joints by one cycle: linear target, then velocity/acceleration limits."""
        vmax, amax = 0.9 * VEL_LIMITS, 0.9 * ACC_LIMITS
        if braking or self._target is None:
            desired = self._q_cmd + self._v_cmd * dt if not braking else self._q_cmd
        else:
            q0, q1, t0, dur = self._target
            alpha = min(1.0, max(0.0, (self._robot_time - t0) / dur))
            desired = q0 + alpha * (q1 - q0)
        err = desired - self._q_cmd
        # never faster than we can still brake within the remaining distance
        v_brake = np.sqrt(2 * amax * np.abs(err)) * np.sign(err)
        v_want = np.clip(err / dt, -np.abs(v_brake), np.abs(v_brake)) if not braking else np.zeros(7)
        v = np.clip(np.clip(v_want, self._v_cmd - amax * dt, self._v_cmd + amax * dt), -vmax, vmax)
        self._q_cmd = np.clip(self._q_cmd + v * dt, self.limits.joint_lower, self.limits.joint_upper)
        self._v_cmd = v

    def _control_loop(self) -> None:
        pf = self._pf
        recoveries = 0
        if self.rt_priority > 0 and hasattr(os, "sched_setscheduler"):
            try:  # above the runner's loop (50): the 1 kHz cycle must never wait for it
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.rt_priority))
            except OSError as e:
                log.warning("%s: no real-time priority for the 1 kHz loop: %s", self.name, e)
        while not self._stopping:
            try:
                ctrl = self._robot.start_joint_position_control(pf.ControllerMode.JointImpedance)
                first = True
                while True:
                    state, duration = ctrl.readOnce()
                    dt = duration.to_sec()
                    q = np.asarray(state.q) + JOINT_OFFSET
                    with self._lock:
                        self._robot_time += dt
                        self._state = (self._robot_time, q, np.asarray(state.dq))
                        braking = self._stopping
                        self._interpolate(dt if dt > 0 else 1e-3, braking)
                        q_out = self._q_cmd - JOINT_OFFSET
                    d = self.diag
                    d["cycles"] += 1
                    if not first:  # the first read of a control session reports the time since the last one
                        d["max_cycle_gap_ms"] = max(d["max_cycle_gap_ms"], dt * 1e3)
                        d["late_cycles"] += dt > 1.5e-3
                    first = False
                    d["min_command_success_rate"] = min(d["min_command_success_rate"], float(state.control_command_success_rate))
                    cmd = pf.JointPositions(q_out.tolist())
                    done = braking and np.all(np.abs(self._v_cmd) < 1e-4)
                    if done:
                        cmd.motion_finished = True
                    ctrl.writeOnce(cmd)
                    if done:
                        return
            except pf.ControlException as e:  # a reflex: recover and resume from where the arm is
                self.diag["comm_errors" if "communication" in str(e).lower() else "recoveries"] += 1
                if self._stopping or recoveries >= self.max_recoveries:
                    self._error = f"control error (after {recoveries} recoveries): {e}"
                    return
                recoveries += 1
                log.warning("%s: control exception, recovering (%d/%d): %s", self.name, recoveries, self.max_recoveries, e)
                try:
                    self._robot.automatic_error_recovery()
                    state = self._robot.read_once()
                except Exception as e2:  # noqa: BLE001
                    self._error = f"error recovery failed: {e2}"
                    return
                with self._lock:
                    self._q_cmd, self._v_cmd = np.asarray(state.q) + JOINT_OFFSET, np.zeros(7)
                    self._target = None
            except Exception as e:  # noqa: BLE001 - NetworkException and anything else: the connection is gone
                self.diag["comm_errors"] += 1
                self._error = f"connection lost: {type(e).__name__}: {e}"
                return

    def _start_gripper(self) -> None:
        """The gripper client lives in its own process: pylibfranka's blocking `Gripper.move` holds
        the GIL, which stalled the 1 kHz thread for the whole move (measured: 470 ms gaps)."""
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
        """Collect the gripper process's replies (no thread of its own: every Python thread in this
        process can hold the GIL while the OS preempts it, which would delay the 1 kHz thread)."""
        import queue

        while True:
            try:
                reply = self._gripper_replies.get_nowait()
            except queue.Empty:
                return
            if isinstance(reply, str):
                log.warning("%s: gripper: %s", self.name, reply)  # a failed move is not fatal for the arm
            else:
                with self._lock:
                    self._gripper_width = reply


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
