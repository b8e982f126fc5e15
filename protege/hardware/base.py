"""The robot protocol, action spaces, and the safety layer that sits between every policy and every robot.

A `Robot` (MuJoCo or a real Franka, the bimanual ALOHA) only knows joint-space commands:
`command(JointCommand)`. It declares its `features` (`RobotFeatures`: the state fields `read()`
provides with shapes and units, and its arms as joint + gripper groups, one arm or two), and the
runner, the safety layer, the action spaces and the recording read them instead of assuming one
7-joint arm. What a policy outputs (joint positions, an end-effector delta or absolute pose, a
gripper width) is turned into a `JointCommand` by a `Controller`: action space -> (IK) -> `SafetyLayer`. The same Controller
runs in the gymnasium Franka env, in the runner on the MuJoCo backend and in the runner on the real
robot, so a policy sees one behaviour everywhere.

Safety (`SafetyLayer`): non-finite actions are rejected (hold), end-effector targets are clipped to
the workspace box and to a maximum step per command, joint targets to the joint limits, to the
maximum step per command and to the velocity and acceleration limits; gripper widths to their range;
joint-space targets whose end effector leaves the workspace are rejected. Every intervention is
counted by kind and logged. `Watchdog`: hold when no fresh action arrived in time, stop after a
timeout. `EStop`: Ctrl-C / SIGTERM / `trigger()`; the runner always ends in `robot.stop()`.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from protege.errors import ConfigError, ProtegeError

log = logging.getLogger("protege.hardware")


class RobotError(ProtegeError):
    """The robot cannot be driven: connection lost, controller error, commanded after stop()."""


# --------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class Feature:
    """One declared state field: its shape and unit (e.g. `(7,)`, "rad")."""

    shape: tuple[int, ...]
    unit: str


@dataclass(frozen=True)
class ArmGroup:
    """One arm: which entries of `joint_pos` are its joints, which entry of `gripper` its gripper."""

    name: str
    joints: tuple[int, ...]
    gripper: int | None = None


@dataclass(frozen=True)
class RobotFeatures:
    """What a robot declares (in the spirit of LeRobot's observation/action features).

    `state`: every field `read()` provides (joint_pos, joint_vel, gripper, ee_pos, ..., simulator
    extras) -> Feature. `arms`: the joint groups, in the order of the joint-position action layout
    (per arm: its joints, then its gripper: ACT's [left 6 + 1, right 6 + 1]). `cartesian`: the robot
    has kinematics for one arm, so end-effector action spaces and the workspace check apply.
    `Observation.get` also resolves `<arm>` (its joints) and `<arm>_gripper` (its gripper)."""

    state: dict[str, Feature]
    arms: tuple[ArmGroup, ...]
    cartesian: bool = False

    @property
    def n_joints(self) -> int:
        return self.state["joint_pos"].shape[0]

    @property
    def n_grippers(self) -> int:
        return self.state["gripper"].shape[0] if "gripper" in self.state else 0

    def action_layout(self) -> list[tuple[str, np.ndarray]]:
        """[("joints" or "gripper", indices)] in joint-position action order."""
        out: list[tuple[str, np.ndarray]] = []
        for arm in self.arms:
            out.append(("joints", np.array(arm.joints)))
            if arm.gripper is not None:
                out.append(("gripper", np.array([arm.gripper])))
        return out

    def group(self, name: str) -> tuple[str, np.ndarray] | None:
        """`<arm>` -> ("joint_pos", its indices); `<arm>_gripper` -> ("gripper", [index]); else None."""
        for arm in self.arms:
            if name == arm.name:
                return "joint_pos", np.array(arm.joints)
            if arm.gripper is not None and name == f"{arm.name}_gripper":
                return "gripper", np.array([arm.gripper])
        return None


def single_arm_features(n_joints: int = 7, cartesian: bool = True, extra: dict[str, Feature] | None = None) -> RobotFeatures:
    """One arm with one parallel gripper (Panda / FR3): joints in rad, gripper opening width in m."""
    state = {"joint_pos": Feature((n_joints,), "rad"), "joint_vel": Feature((n_joints,), "rad/s"),
             "gripper": Feature((1,), "m (opening width)")}
    if cartesian:
        state.update(ee_pos=Feature((3,), "m (base frame)"), ee_quat=Feature((4,), "quaternion w,x,y,z"))
    return RobotFeatures({**state, **(extra or {})}, (ArmGroup("arm", tuple(range(n_joints)), 0),), cartesian)


# --------------------------------------------------------------------------------------------- records
@dataclass
class Observation:
    """One reading of the robot. `t` is robot time in seconds (monotonic; simulated time in a
    simulator). `images[cam]` is None when a camera delivered no frame; `image_t[cam]` is its capture
    time on the robot's `clock` (the runner checks frame age against it). `extra` holds what only a
    simulator knows (object and goal positions), keyed by name."""

    t: float
    joint_pos: np.ndarray  # (n_joints,) rad, all arms
    joint_vel: np.ndarray  # (n_joints,) rad/s
    ee_pos: np.ndarray | None  # (3,) m, base frame; None without Cartesian kinematics
    ee_quat: np.ndarray | None  # (4,) w, x, y, z
    gripper: np.ndarray  # (n_grippers,) in the robot's declared unit
    images: dict[str, np.ndarray | None] = field(default_factory=dict)
    image_t: dict[str, float | None] = field(default_factory=dict)  # capture time of each image, on the robot's clock
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    features: RobotFeatures | None = None  # the robot's declaration: resolves arm group names in get()

    def get(self, name: str) -> np.ndarray:
        """A named state field: a dataclass field (joint_pos, ee_pos, ...), an `extra` entry, or an arm
        group of the robot's features (`left_arm`, `left_arm_gripper`, ...)."""
        if name in self.extra:
            return np.asarray(self.extra[name])
        if name in ("joint_pos", "joint_vel", "ee_pos", "ee_quat", "gripper") and getattr(self, name) is not None:
            return np.asarray(getattr(self, name))
        grp = self.features.group(name) if self.features is not None else None
        if grp is not None:
            return np.asarray(getattr(self, grp[0]))[grp[1]]
        known = [k for k in ("joint_pos", "joint_vel", "ee_pos", "ee_quat", "gripper") if getattr(self, k) is not None]
        if self.features is not None:
            known += [a.name for a in self.features.arms] + [f"{a.name}_gripper" for a in self.features.arms if a.gripper is not None]
        raise ConfigError(f"observation field {name!r} is not provided by this robot; available: {[*known, *self.extra]}")


@dataclass
class JointCommand:
    q: np.ndarray  # (n_joints,) joint position targets, rad
    gripper: np.ndarray  # (n_grippers,) targets in the robot's gripper unit (Panda: opening width, m)


@dataclass
class Limits:
    """Declared limits of a robot; the safety layer enforces them on every command."""

    joint_lower: np.ndarray
    joint_upper: np.ndarray
    joint_vel: np.ndarray  # rad/s
    joint_acc: np.ndarray  # rad/s^2
    workspace_lower: np.ndarray | None  # (3,) m, end-effector box in the base frame (None: no Cartesian kinematics)
    workspace_upper: np.ndarray | None
    gripper_min: float = 0.0  # (or one value per gripper)
    gripper_max: float = 0.08
    max_joint_step: float = 0.25  # rad per command
    max_ee_step: float = 0.05  # m per command

    @classmethod
    def panda(cls, joint_lower: np.ndarray, joint_upper: np.ndarray, **overrides: object) -> Limits:
        from protege.hardware.panda import ACC_LIMITS, GRIPPER_MAX, VEL_LIMITS

        kw: dict = dict(joint_lower=np.asarray(joint_lower, float), joint_upper=np.asarray(joint_upper, float),
                        joint_vel=VEL_LIMITS.copy(), joint_acc=ACC_LIMITS.copy(),
                        workspace_lower=np.array([0.2, -0.45, 0.005]), workspace_upper=np.array([0.8, 0.45, 0.6]),
                        gripper_max=GRIPPER_MAX)
        for k, v in overrides.items():
            if v is not None:
                kw[k] = np.asarray(v, float) if isinstance(v, (list, tuple, np.ndarray)) else v
        return cls(**kw)


# ----------------------------------------------------------------------------------------------- clocks
class MonotonicClock:
    """Wall time on the monotonic clock. `sleep_until` sleeps to `SPIN_S` before the deadline and
    spins the rest: plain `time.sleep` overshoots by milliseconds on a loaded machine."""

    realtime = True
    SPIN_S = 2e-3

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        remaining = t - time.monotonic()
        if remaining > self.SPIN_S:
            time.sleep(remaining - self.SPIN_S)
        while time.monotonic() < t:
            pass


@runtime_checkable
class Robot(Protocol):
    name: str
    features: RobotFeatures  # what read() provides and how the arms / grippers are laid out
    limits: Limits
    cameras: list[str]  # names of the attached cameras (hardware config `cameras:`), frames in read().images
    clock: MonotonicClock  # or a simulated clock with the same two methods and `realtime = False`

    def connect(self) -> None: ...
    def read(self) -> Observation: ...
    def command(self, cmd: JointCommand) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------- action spaces
class ActionSpace:
    """How a policy's action vector maps to targets. `ee_target` returns an end-effector target
    (position, orientation or None) for Cartesian spaces, `joint_target` the joints for joint space."""

    name = ""
    dim = 0
    cartesian = True

    def split(self, action: np.ndarray, obs: Observation) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """-> (joint or end-effector target, orientation or None, gripper targets (n_grippers,))"""
        raise NotImplementedError

    def hold_action(self, obs: Observation, cmd: JointCommand) -> np.ndarray:
        """The action that means 'stay where the held command is', recorded on held steps."""
        raise NotImplementedError


class JointPositionSpace(ActionSpace):
    """Absolute joint targets in the robot's declared layout: per arm its joints then its gripper
    (Panda: [q1..q7, width]; ALOHA: [left 6, left gripper, right 6, right gripper])."""

    name, cartesian = "joint_pos", False

    def __init__(self, features: RobotFeatures | None = None) -> None:
        f = features or single_arm_features()
        self.layout = f.action_layout()
        self.n_joints, self.n_grippers = f.n_joints, f.n_grippers
        self.dim = self.n_joints + self.n_grippers
        # positions of the joints and grippers inside the action vector
        self.joint_slots = np.zeros(self.n_joints, int)
        self.gripper_slots = np.zeros(self.n_grippers, int)
        i = 0
        for kind, idx in self.layout:
            slots = self.joint_slots if kind == "joints" else self.gripper_slots
            slots[idx] = np.arange(i, i + len(idx))
            i += len(idx)

    def split(self, action, obs):  # noqa: ANN001, ANN201
        return action[self.joint_slots], None, action[self.gripper_slots]

    def hold_action(self, obs, cmd):  # noqa: ANN001, ANN201
        out = np.zeros(self.dim, np.float32)
        out[self.joint_slots], out[self.gripper_slots] = cmd.q, cmd.gripper
        return out


class EEDeltaSpace(ActionSpace):
    """[dx, dy, dz, gripper width]: a position step from the measured end effector, metres; the
    orientation is held at `orientation` (gripper pointing down)."""

    name, dim = "ee_delta", 4

    def __init__(self, orientation: np.ndarray | None = None) -> None:
        from protege.hardware.panda import DOWN_QUAT

        self.quat = DOWN_QUAT if orientation is None else np.asarray(orientation, float)

    def split(self, action, obs):  # noqa: ANN001, ANN201
        return obs.ee_pos + action[:3], self.quat, action[3:4]

    def hold_action(self, obs, cmd):  # noqa: ANN001, ANN201
        return np.array([0.0, 0.0, 0.0, *cmd.gripper], np.float32)


class EEPoseSpace(ActionSpace):
    """[x, y, z, gripper] (orientation held down) or [x, y, z, qw, qx, qy, qz, gripper]: absolute pose."""

    name = "ee_pose"

    def __init__(self, with_orientation: bool = False) -> None:
        from protege.hardware.panda import DOWN_QUAT

        self.with_orientation, self.dim, self.quat = with_orientation, 8 if with_orientation else 4, DOWN_QUAT

    def split(self, action, obs):  # noqa: ANN001, ANN201
        if self.with_orientation:
            q = action[3:7] / max(np.linalg.norm(action[3:7]), 1e-9)
            return action[:3].astype(float), q, action[7:8]
        return action[:3].astype(float), self.quat, action[3:4]

    def hold_action(self, obs, cmd):  # noqa: ANN001, ANN201
        pos = obs.ee_pos
        rest = [*obs.ee_quat] if self.with_orientation else []
        return np.array([*pos, *rest, *cmd.gripper], np.float32)


def make_action_space(name: str, features: RobotFeatures | None = None) -> ActionSpace:
    """An action space for a robot with `features` (default: one 7-joint arm with Cartesian kinematics)."""
    spaces = {"joint_pos": lambda: JointPositionSpace(features), "ee_delta": EEDeltaSpace, "ee_pose": EEPoseSpace,
              "ee_pose_quat": lambda: EEPoseSpace(with_orientation=True)}
    if name not in spaces:
        raise ConfigError(f"unknown action space {name!r}; expected one of {sorted(spaces)}")
    if name != "joint_pos" and features is not None and not (features.cartesian and len(features.arms) == 1):
        raise ConfigError(f"action space {name!r} needs one arm with Cartesian kinematics; this robot declares "
                          f"{[a.name for a in features.arms]} (cartesian={features.cartesian}): use joint_pos")
    return spaces[name]()


# ------------------------------------------------------------------------------------------------ safety
class SafetyLayer:
    """Enforces `Limits` on every command; counts (and logs) every intervention by kind."""

    def __init__(self, limits: Limits, dt: float) -> None:
        self.limits, self.dt = limits, float(dt)
        self.counts: collections.Counter[str] = collections.Counter()
        self.reset()

    def reset(self) -> None:
        self.prev_q: np.ndarray | None = None  # last commanded joint targets
        self.prev_dq: np.ndarray | None = None  # last commanded joint step
        self.last_gripper: np.ndarray | None = None  # last commanded gripper targets

    def intervene(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        n = self.counts[kind]
        if n <= 3 or n % 100 == 0:  # log the first few of each kind, then every 100th
            log.warning("safety: %s (#%d): %s", kind, n, detail)

    def finite(self, action: np.ndarray) -> bool:
        if np.isfinite(action).all():
            return True
        self.intervene("non_finite_action", f"action {np.array2string(action, precision=3)} rejected, holding")
        return False

    def clip_ee(self, target: np.ndarray, current: np.ndarray) -> np.ndarray:
        L = self.limits
        if L.workspace_lower is None:
            raise ConfigError("end-effector targets need a robot that declares a workspace (Cartesian kinematics)")
        clipped = np.clip(target, L.workspace_lower, L.workspace_upper)
        if not np.allclose(clipped, target):
            self.intervene("workspace", f"end-effector target {target.round(3)} clipped to the box -> {clipped.round(3)}")
        step = clipped - current
        n = np.linalg.norm(step)
        if n > L.max_ee_step + 1e-9:
            self.intervene("max_ee_step", f"end-effector step {n:.3f} m > {L.max_ee_step} m, scaled down")
            clipped = current + step * (L.max_ee_step / n)
        return clipped

    def in_workspace(self, ee_pos: np.ndarray) -> bool:
        L = self.limits
        if L.workspace_lower is None:
            return True
        if np.all(ee_pos >= L.workspace_lower - 1e-6) and np.all(ee_pos <= L.workspace_upper + 1e-6):
            return True
        self.intervene("workspace", f"joint target puts the end effector at {ee_pos.round(3)}, outside the box; holding")
        return False

    def clip_joints(self, q: np.ndarray, q_measured: np.ndarray) -> np.ndarray:
        L = self.limits
        out = np.clip(q, L.joint_lower, L.joint_upper)
        if not np.allclose(out, q):
            self.intervene("joint_limit", f"joint target beyond the limits by up to {np.abs(out - q).max():.3f} rad, clipped")
        ref = q_measured if self.prev_q is None else self.prev_q
        dq = out - ref
        max_step = np.minimum(L.max_joint_step, L.joint_vel * self.dt)
        if np.any(np.abs(dq) > max_step + 1e-9):
            kind = "max_joint_step" if np.any(np.abs(dq) > L.max_joint_step + 1e-9) else "joint_velocity"
            self.intervene(kind, f"joint step up to {np.abs(dq).max():.3f} rad in {self.dt * 1e3:.0f} ms, limited")
            dq = np.clip(dq, -max_step, max_step)
        if self.prev_dq is not None:
            max_ddq = L.joint_acc * self.dt**2
            ddq = dq - self.prev_dq
            if np.any(np.abs(ddq) > max_ddq + 1e-9):
                self.intervene("joint_acceleration", f"joint acceleration up to {np.abs(ddq / self.dt**2).max():.1f} rad/s^2, limited")
                dq = self.prev_dq + np.clip(ddq, -max_ddq, max_ddq)
        out = np.clip(ref + dq, L.joint_lower, L.joint_upper)
        self.prev_q, self.prev_dq = out, out - ref
        return out

    def clip_gripper(self, width: np.ndarray) -> np.ndarray:
        L = self.limits
        width = np.asarray(width, float).reshape(-1)
        out = np.clip(width, L.gripper_min, L.gripper_max)
        if np.any(out != width):
            self.intervene("gripper_limit", f"gripper target {np.round(width, 4)} outside [{L.gripper_min}, {L.gripper_max}], clipped")
        return out

    def hold(self, obs: Observation) -> JointCommand:
        """Hold: the last commanded joints (or the measured ones before any command); joint motion stops."""
        q = obs.joint_pos.copy() if self.prev_q is None else self.prev_q.copy()
        self.prev_dq = np.zeros_like(q)
        return JointCommand(q=q, gripper=np.array(obs.gripper, float) if self.last_gripper is None else self.last_gripper.copy())


class Controller:
    """Policy action -> safe `JointCommand`: action space, IK, safety. One per robot (or env)."""

    def __init__(self, kinematics: object, action_space: ActionSpace, safety: SafetyLayer) -> None:
        self.kin, self.space, self.safety = kinematics, action_space, safety

    def reset(self) -> None:
        self.safety.reset()

    def hold(self, obs: Observation) -> JointCommand:
        return self.safety.hold(obs)

    def __call__(self, action: np.ndarray, obs: Observation) -> tuple[JointCommand, bool]:
        """Returns the command and whether it carries the action (False: the action was rejected, hold)."""
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (self.space.dim,):
            raise ConfigError(f"action space {self.space.name!r}: expected actions of size {self.space.dim}, "
                              f"the policy produced {action.shape[0]}")
        s = self.safety
        if not s.finite(action):
            return self.hold(obs), False
        target, quat, grip = self.space.split(action, obs)
        if self.space.cartesian:
            target = s.clip_ee(target, obs.ee_pos)
            q_init = obs.joint_pos if s.prev_q is None else s.prev_q
            q = self.kin.ik(target, quat, q_init)
        else:
            q = np.asarray(target, float)
            if self.kin is not None and not s.in_workspace(self.kin.fk(np.clip(q, s.limits.joint_lower, s.limits.joint_upper))[0]):
                return self.hold(obs), False
        q = s.clip_joints(q, obs.joint_pos)
        s.last_gripper = s.clip_gripper(grip)
        return JointCommand(q=q, gripper=s.last_gripper), True


# ----------------------------------------------------------------------------------- watchdog and e-stop
class Watchdog:
    """`feed()` on every fresh action. `state(now)`: 'ok'; 'hold' once the last action is older than
    one period (the robot keeps its last command); 'expired' after `timeout` s without one (stop)."""

    def __init__(self, period: float, timeout: float) -> None:
        if timeout <= 0:
            raise ConfigError(f"watchdog timeout must be > 0 s, got {timeout}")
        self.period, self.timeout = period, timeout
        self.last: float | None = None

    def feed(self, now: float) -> None:
        self.last = now

    def state(self, now: float) -> str:
        if self.last is None:
            self.last = now
        age = now - self.last
        return "expired" if age > self.timeout else "hold" if age > 0.5 * self.period else "ok"


class EStop:
    """Emergency stop: `trigger(reason)` from anywhere (another thread, a signal handler, a UI).
    While `signals()` is active, SIGINT and SIGTERM trigger it; a second SIGINT raises KeyboardInterrupt.
    The runner polls `triggered` every tick and always ends in `robot.stop()`."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def trigger(self, reason: str = "programmatic e-stop") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()
            log.warning("e-stop: %s", reason)

    @property
    def triggered(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        self._event.clear()
        self.reason = None

    @contextmanager
    def signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum: int, frame: object) -> None:
            name = signal.Signals(signum).name
            if self.triggered and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.trigger(name)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# ----------------------------------------------------------------------------------------- observations
def policy_observation(obs: Observation, state_keys: list[str] | dict[str, list[str]],
                       cameras: list[str]) -> dict[str, np.ndarray] | None:
    """The policy's view of a robot observation: {'state': concat(state_keys), <cam>: image}, the
    same layout the gymnasium env returns; `state_keys` may also map several policy keys to their
    fields ({'state': [left_arm, ...], 'env_state': [env_state]}). None when a camera frame is missing."""
    groups = state_keys if isinstance(state_keys, dict) else {"state": state_keys}
    out = {name: np.concatenate([obs.get(k).reshape(-1) for k in keys]).astype(np.float32) for name, keys in groups.items()}
    for cam in cameras:
        img = obs.images.get(cam)
        if img is None:
            return None
        out[cam] = img
    return out
