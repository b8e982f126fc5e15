"""Real Franka backend over the official `pylibfranka` bindings (libfranka 0.21).

Why pylibfranka and not franky-control: we need to own the 1 kHz loop (interpolate between policy
targets that arrive at 10-50 Hz, keep the commanded motion continuous, recover from reflexes), and
pylibfranka exposes exactly that (`start_joint_position_control` -> `readOnce`/`writeOnce`), while
franky's strength is its own motion generators (Ruckig trajectories), which would sit between our
safety layer and the robot. pylibfranka is Franka's own, versioned with libfranka.

The 1 kHz loop runs in its own thread (SCHED_FIFO priority 80 when allowed, above the runner's
loop); the runner only swaps in a new target (under a lock), so the
loop never waits for policy inference (which runs in another process by default). Each cycle
`interpolation.JerkLimitedInterpolator` (Ruckig) turns the newest target into the next joint position
within the model's official position, velocity, acceleration and jerk limits (`panda.FRANKA_SPECS`;
libfranka rejects a command stream that violates them), so the commanded motion stays continuous as
libfranka requires. Reflex / control errors are recovered automatically (`automatic_error_recovery`,
at most `max_recoveries` times); a network error ends the loop and the next `read()`/`command()`
raises `RobotError`. `stop()` brakes to rest, finishes the motion and joins the process.

Gripper (Franka Hand, its own process: its commands block): the action's width chooses the command.
A closing command (narrower than the last one by more than `gripper_hysteresis`) is a `grasp` with
`gripper_force` and the epsilons (the fingers stop on the object and hold it with that force; with
the default outer epsilon any width between the command and fully open counts as a grasp); an opening
command is a `move` to the width (release). A plain `move` cannot hold an object: it stops on contact
without force.

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
from protege.hardware.base import JointCommand, Limits, MonotonicClock, Observation, RobotError, single_arm_features
from protege.hardware.cameras import CameraError, CameraSet
from protege.hardware.interpolation import JerkLimitedInterpolator, JointLimits
from protege.hardware.panda import FRANKA_SPECS, PandaKinematics

log = logging.getLogger("protege.hardware.franka")

JOINT_OFFSET = np.array([0.0, 0.0, 0.0, 0.0, 0.0, -np.pi / 2, 0.0])


# shared-memory layout (float64): state written by the loop, goal written by the runner, diagnostics
_T, _Q, _DQ, _GOAL, _SEQ = 0, slice(1, 8), slice(8, 15), slice(15, 22), 22
_CYCLES, _MAXGAP, _LATE, _COMM, _RECOV, _MINSUCC, _STOPPING, _FINISHED = range(23, 31)
# largest commanded |velocity|, |acceleration|, |jerk| (finite differences over consecutive 1 ms cycles)
# as a fraction of the limit, the largest |jerk| itself, and the interpolator's counters
_MAXV, _MAXA, _MAXJ, _MAXJ_ABS, _REJECTED, _STALE, _CLIPPED, _RETRIES = range(31, 39)
_SHM_SIZE = 39
_INTERP_COUNTS = {"rejected": _REJECTED, "stale": _STALE, "clipped": _CLIPPED, "planner_retries": _RETRIES}


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
        gripper_force: float = 20.0,
        gripper_epsilon_inner: float = 0.005,
        gripper_epsilon_outer: float = 0.08,
        gripper_hysteresis: float = 0.005,
        connect_timeout: float = 30.0,
        rt_priority: int = 80,
        limit_scale: float = 0.9,
        stale_after: float = 0.5,
    ) -> None:
        if cameras and not isinstance(cameras, Mapping):
            raise ConfigError(f"franka robot: the policy needs camera(s) {list(cameras)}; say which device each one is "
                              "in hardware.cameras (name -> {backend: opencv|realsense|replay, <options>})")
        if model not in FRANKA_SPECS:
            raise ConfigError(f"franka robot: model must be one of {sorted(FRANKA_SPECS)}, got {model!r}")
        if not 0.0 < gripper_force <= 70.0:  # the Franka Hand's continuous force is 70 N
            raise ConfigError(f"franka robot: gripper_force must be in (0, 70] N, got {gripper_force}")
        if realtime_config not in ("enforce", "ignore"):
            raise ConfigError(f"franka robot: realtime_config must be 'enforce' or 'ignore', got {realtime_config!r}")
        self.hostname, self.name, self.model, self.use_gripper = hostname, name, model, gripper
        self.realtime_config, self.max_recoveries = realtime_config, max_recoveries
        self.gripper_params = {"speed": gripper_speed, "force": gripper_force, "epsilon_inner": gripper_epsilon_inner,
                               "epsilon_outer": gripper_epsilon_outer}
        self.gripper_hysteresis = gripper_hysteresis
        self.connect_timeout, self.rt_priority = connect_timeout, rt_priority
        self.interp_params = {"scale": limit_scale, "stale_after": stale_after}
        self.kinematics = PandaKinematics()
        spec = FRANKA_SPECS[model]
        lower = np.maximum(spec["lower"] + JOINT_OFFSET, self.kinematics.lower)
        upper = np.minimum(spec["upper"] + JOINT_OFFSET, self.kinematics.upper)
        # the safety layer checks policy targets against this model's maxima (FR3's, not Panda's)
        overrides = {"joint_vel": spec["velocity"], "joint_acc": spec["acceleration"], **(limits or {})}
        self.limits = Limits.panda(lower, upper, **overrides)
        # the 1 kHz loop works in Franka's joint convention, within the same (possibly narrowed) range
        self.joint_limits = JointLimits.from_spec(spec, self.limits.joint_lower - JOINT_OFFSET,
                                                  self.limits.joint_upper - JOINT_OFFSET)
        if not 0.0 < limit_scale <= 1.0:
            raise ConfigError(f"franka robot: limit_scale (fraction of the joint limits the 1 kHz interpolator "
                              f"may use) must be in (0, 1], got {limit_scale}")
        self.features = single_arm_features(7, cartesian=True)
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
            self.joint_limits, self.interp_params, self._shm, self._lock, self._err))
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
                           images=images, image_t=stamps, features=self.features)

    def command(self, cmd: JointCommand) -> None:
        self._check()
        if self.stopped:
            raise RobotError(f"{self.name}: command after stop(); reconnect first")
        self._seq += 1
        with self._lock:
            self._shm[_GOAL] = np.asarray(cmd.q, float).tolist()
            self._shm[_SEQ] = self._seq
        if self._gripper_proc is not None:
            last = self._gripper_width if self._gripper_sent is None else self._gripper_sent
            width = float(np.asarray(cmd.gripper).reshape(-1)[0])  # one gripper (features: arm_gripper)
            action = gripper_action(width, last, self.gripper_hysteresis)
            if action is not None:  # each gripper command blocks the gripper: send changes only
                self._gripper_requests.put((action, width))
                self._gripper_sent = width

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
        d = {"cycles": int(s[_CYCLES]), "max_cycle_gap_ms": float(s[_MAXGAP]), "late_cycles": int(s[_LATE]),
             "comm_errors": int(s[_COMM]), "recoveries": int(s[_RECOV]), "min_command_success_rate": float(s[_MINSUCC]),
             "max_velocity_ratio": float(s[_MAXV]), "max_acceleration_ratio": float(s[_MAXA]),
             "max_jerk_ratio": float(s[_MAXJ]), "max_jerk": float(s[_MAXJ_ABS]),
             "jerk_limit": float(self.joint_limits.jerk.min()), "error": self._error()}
        d.update({f"interpolator_{k}": int(s[i]) for k, i in _INTERP_COUNTS.items()})
        if hasattr(self, "_gripper_counts"):
            d.update({f"gripper_{k}": v for k, v in self._gripper_counts.items()})
        return d

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
                                         args=(self.hostname, self.gripper_params, self.limits.gripper_max,
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
        self._gripper_width = width["width"]
        self._gripper_sent: float | None = None
        self._gripper_counts = {"grasps": 0, "failed_grasps": 0, "releases": 0, "grasped": False}

    def _gripper_poll(self) -> None:
        """Collect the gripper process's replies (polled from `read()`, no thread needed)."""
        import queue

        while True:
            try:
                reply = self._gripper_replies.get_nowait()
            except queue.Empty:
                return
            if isinstance(reply, str):
                log.warning("%s: gripper: %s", self.name, reply)  # a failed command is not fatal for the arm
                continue
            self._gripper_width = reply["width"]
            c = self._gripper_counts
            c["grasped"] = reply["grasped"]
            if reply.get("action") == "grasp":
                c["grasps"] += 1
                c["failed_grasps"] += not reply["ok"]
            elif reply.get("action") == "release":
                c["releases"] += 1


def gripper_action(width: float, last: float, hysteresis: float) -> str | None:
    """Which gripper command a commanded width means: 'grasp' when it closes (narrower than the last
    command, or the measured width before any, by more than `hysteresis`), 'release' when it opens,
    None when it is about the same (a policy's small jitter must not re-grasp: each command blocks
    the gripper for its whole motion)."""
    if width < last - hysteresis:
        return "grasp"
    if width > last + hysteresis:
        return "release"
    return None


class _Diff:
    """Largest |velocity|, |acceleration|, |jerk| of the commanded positions by finite differences
    over consecutive 1 ms cycles (what libfranka checks), relative to the limits."""

    def __init__(self, limits: JointLimits) -> None:
        self.limits, self.hist = limits, []

    def reset(self) -> None:
        self.hist = []

    def add(self, q: np.ndarray, dt: float, shm: Any) -> None:
        if abs(dt - 1e-3) > 1e-4:  # a lost cycle: differences across it are not per-millisecond
            self.hist = []
        self.hist = (self.hist + [q])[-4:]
        h = self.hist
        L = self.limits
        if len(h) >= 2:
            shm[_MAXV] = max(shm[_MAXV], float(np.max(np.abs(h[-1] - h[-2]) / 1e-3 / L.velocity)))
        if len(h) >= 3:
            shm[_MAXA] = max(shm[_MAXA], float(np.max(np.abs(h[-1] - 2 * h[-2] + h[-3]) / 1e-6 / L.acceleration)))
        if len(h) == 4:
            j = np.abs(h[-1] - 3 * h[-2] + 3 * h[-3] - h[-4]) / 1e-9
            shm[_MAXJ] = max(shm[_MAXJ], float(np.max(j / L.jerk)))
            shm[_MAXJ_ABS] = max(shm[_MAXJ_ABS], float(np.max(j)))


def _control_process(hostname: str, realtime_config: str, max_recoveries: int, rt_priority: int,
                     limits: JointLimits, interp_params: dict[str, float], shm: Any, lock: Any, err: Any) -> None:
    """The 1 kHz loop (its own process): read state, step the interpolator toward the newest goal, write.
    Runs in Franka's joint convention; the shared memory holds the model's."""
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
    interp = JerkLimitedInterpolator(limits, np.asarray(state.q), **interp_params)
    diff = _Diff(limits)
    seq, robot_time, recoveries = 0.0, 0.0, 0
    while True:
        try:
            ctrl = robot.start_joint_position_control(pf.ControllerMode.JointImpedance)
            first = True
            while True:
                state, duration = ctrl.readOnce()
                dt = duration.to_sec()
                robot_time += dt
                with lock:
                    shm[_T] = robot_time
                    shm[_Q] = (np.asarray(state.q) + JOINT_OFFSET).tolist()
                    shm[_DQ] = list(state.dq)
                    new_seq, goal = shm[_SEQ], np.array(shm[_GOAL])
                if first:  # a control session starts from rest where the arm is (also after a recovery)
                    interp.reset(np.asarray(state.q), robot_time)
                    diff.reset()
                braking = shm[_STOPPING] > 0
                if braking:
                    interp.brake()
                elif new_seq != seq:
                    seq = new_seq
                    interp.set_target(goal - JOINT_OFFSET, robot_time)
                if first:
                    q_cmd = interp.q.copy()
                else:
                    q_cmd = interp.step(robot_time)
                    # the first read of a control session reports the time since the last one
                    shm[_MAXGAP] = max(shm[_MAXGAP], dt * 1e3)
                    shm[_LATE] += dt > 1.5e-3
                    diff.add(q_cmd, dt, shm)
                first = False
                shm[_CYCLES] += 1
                shm[_MINSUCC] = min(shm[_MINSUCC], float(state.control_command_success_rate))
                for k, i in _INTERP_COUNTS.items():
                    shm[i] = interp.counts[k]
                cmd = pf.JointPositions(q_cmd.tolist())
                done = braking and interp.at_rest
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
                robot.read_once()
            except Exception as e2:  # noqa: BLE001
                fail(f"error recovery failed: {e2}")
                return
        except Exception as e:  # noqa: BLE001 - NetworkException and anything else: the connection is gone
            shm[_COMM] += 1
            fail(f"connection lost: {type(e).__name__}: {e}")
            return


def _gripper_server(hostname: str, params: dict[str, float], max_width: float, requests: Any, replies: Any) -> None:
    """Gripper process: run each requested ('grasp' | 'release', width) (the newest one wins) and reply
    with the result, the width and whether an object is held."""
    import queue
    import signal

    import pylibfranka as pf

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the runner, which stops everything
    try:
        gripper = pf.Gripper(hostname)
        st = gripper.read_once()
        replies.put({"width": float(st.width), "grasped": bool(st.is_grasped)})
    except Exception as e:  # noqa: BLE001
        replies.put(f"cannot connect: {e}")
        return
    while True:
        request = requests.get()
        try:
            while True:  # skip to the newest request
                request = requests.get_nowait()
        except queue.Empty:
            pass
        if request is None:
            return
        action, width = request
        width = float(np.clip(width, 0.0, max_width))
        try:
            if action == "grasp":
                ok = gripper.grasp(width, params["speed"], params["force"], params["epsilon_inner"],
                                   params["epsilon_outer"])
            else:
                ok = gripper.move(width, params["speed"])
            st = gripper.read_once()
            replies.put({"action": action, "ok": bool(ok), "width": float(st.width), "grasped": bool(st.is_grasped)})
        except Exception as e:  # noqa: BLE001
            replies.put(f"{action} to {width:.3f} m failed: {e}")
