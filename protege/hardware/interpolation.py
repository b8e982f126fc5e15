"""Jerk-limited interpolation of policy targets for a 1 kHz joint-position interface (Ruckig).

A policy sends joint targets at 10-50 Hz; a Franka expects a new joint position every millisecond
whose finite-difference velocity, acceleration and jerk stay within its limits (otherwise libfranka
raises a `joint_motion_generator_*_discontinuity` reflex and the arm stops). Between the two sits
`JerkLimitedInterpolator`: each new target starts a straight-line reference that reaches it over the
`JerkLimitedInterpolator`: every cycle Ruckig (a maintained online trajectory generator;
pantor/ruckig, MIT) plans from the commanded state (position, velocity, acceleration) to the newest
target, to arrive one command interval after it was sent (the measured interval between targets)
with the velocity the targets are moving at, and we command the plan's first sample. So a 10-50 Hz
stream of targets gives continuous motion without stopping at each one, and a single target gives a
smooth point-to-point move.
Re-planning from the exact previous sample keeps position, velocity and acceleration continuous and
the jerk within its bound, whatever the targets do: steps, jumps, NaNs (rejected, counted) or targets
that stop arriving (after `stale_after` s the interpolator brakes to rest and holds, counted).

Joint position limits are kept by a velocity bound that shrinks near them (FR3's official shape,
`JointLimits.velocity_bounds`; the planner uses a stricter copy): the arm always brakes in time, so a
target at, or beyond, a limit never makes the commanded motion overshoot it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protege.errors import ConfigError


@dataclass(frozen=True)
class JointLimits:
    """Per-joint limits (rad, rad/s, rad/s^2, rad/s^3) and the position-dependent velocity bound
    v_max(q) = min(velocity, max(0, -v_offset + sqrt(v_gain * (upper_v - q)))), mirrored for v_min(q)."""

    lower: np.ndarray
    upper: np.ndarray
    velocity: np.ndarray
    acceleration: np.ndarray
    jerk: np.ndarray
    v_gain: np.ndarray
    v_offset: np.ndarray
    upper_v: np.ndarray
    lower_v: np.ndarray

    @classmethod
    def from_spec(cls, spec: dict[str, np.ndarray], lower: np.ndarray | None = None,
                  upper: np.ndarray | None = None) -> JointLimits:
        """From a datasheet table (`panda.FRANKA_SPECS[model]`), optionally with a narrower position
        range. A table without a position-dependent velocity bound (Panda) gets one that brakes at half
        the acceleration limit and stops 1-2 mrad short of each position limit (our choice, not Franka's)."""
        lo = np.maximum(spec["lower"], lower) if lower is not None else spec["lower"]
        hi = np.minimum(spec["upper"], upper) if upper is not None else spec["upper"]
        if np.any(lo >= hi):
            raise ConfigError(f"joint limits: empty position range, lower {lo} >= upper {hi}")
        acc = spec["acceleration"]
        return cls(lower=np.array(lo, float), upper=np.array(hi, float), velocity=np.array(spec["velocity"], float),
                   acceleration=np.array(acc, float), jerk=np.array(spec["jerk"], float),
                   v_gain=np.array(spec.get("v_gain", acc), float),
                   v_offset=np.array(spec.get("v_offset", np.full(len(acc), 0.1)), float),
                   upper_v=np.array(spec.get("upper_v", spec["upper"]), float),
                   lower_v=np.array(spec.get("lower_v", spec["lower"]), float))

    def velocity_bounds(self, q: np.ndarray, gain_scale: float = 1.0, extra_offset: float = 0.0,
                        scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(v_min(q), v_max(q)); with gain_scale < 1 / extra_offset > 0: a stricter bound of the same shape."""
        g, c = self.v_gain * gain_scale, self.v_offset + extra_offset
        vmax = scale * self.velocity
        hi = np.minimum(vmax, np.maximum(0.0, -c + np.sqrt(np.maximum(0.0, g * (self.upper_v - q)))))
        lo = np.maximum(-vmax, np.minimum(0.0, c - np.sqrt(np.maximum(0.0, g * (q - self.lower_v)))))
        return lo, hi

    def target_range(self, gain_scale: float, extra_offset: float, v_floor: float) -> tuple[np.ndarray, np.ndarray]:
        """Positions where the (stricter) velocity bound still allows `v_floor` toward the nearer
        limit: targets are clipped into it, so the arm can always reach them."""
        margin = (self.v_offset + extra_offset + v_floor) ** 2 / (self.v_gain * gain_scale)
        return np.maximum(self.lower, self.lower_v + margin), np.minimum(self.upper, self.upper_v - margin)


class JerkLimitedInterpolator:
    """Policy targets in, one jerk-limited joint position per `dt` out.

    `scale` is the fraction of the velocity, acceleration and jerk limits the planner may use; the
    rest is headroom for the robot's own finite-difference checks. Not thread-safe: one owner (the
    1 kHz loop) calls `set_target`, `step`, `brake` and `reset`.
    """

    def __init__(self, limits: JointLimits, q0: np.ndarray, dt: float = 1e-3, scale: float = 0.9,
                 stale_after: float = 0.5, max_segment: float = 0.2) -> None:
        from ruckig import InputParameter, OutputParameter, Ruckig

        if not 0.0 < scale <= 1.0:
            raise ConfigError(f"interpolator: scale must be in (0, 1], got {scale}")
        self.limits, self.dt, self.scale = limits, float(dt), float(scale)
        self.stale_after, self.max_segment = float(stale_after), float(max_segment)
        self.n = len(limits.lower)
        self._otg = Ruckig(self.n, self.dt)
        self._inp, self._out = InputParameter(self.n), OutputParameter(self.n)
        self._inp.max_acceleration = (scale * limits.acceleration).tolist()
        self._inp.max_jerk = (scale * limits.jerk).tolist()
        # the planner's velocity bound is stricter than the robot's (half the braking gain, 0.1 rad/s
        # more offset), so the few cycles Ruckig needs to brake back under it stay under the robot's
        self._env = dict(gain_scale=0.8, extra_offset=0.1)
        self._lo, self._hi = limits.target_range(v_floor=0.05, **self._env)
        self.counts = {"rejected": 0, "stale": 0, "clipped": 0, "planner_retries": 0}
        self.reset(q0)

    # ------------------------------------------------------------------------------------ control
    def reset(self, q: np.ndarray, t: float = 0.0) -> None:
        """Start from rest at `q` (connect, or after an error recovery): no target, hold `q`."""
        q = np.asarray(q, float)
        if q.shape != (self.n,) or not np.isfinite(q).all():
            raise ConfigError(f"interpolator: reset needs {self.n} finite joint positions, got {q}")
        self.q, self.v, self.a = q.copy(), np.zeros(self.n), np.zeros(self.n)
        self.t = float(t)
        self._goal, self._goal_v, self._t_arrive = self.q.copy(), np.zeros(self.n), self.t
        self._last_target_t: float | None = None
        self._braking = False
        self._holding = False  # braked because targets went stale; the next target resumes

    def set_target(self, q_goal: np.ndarray, t: float) -> bool:
        """A new policy target at time `t`; returns False (and counts it) when rejected: wrong size or
        not finite. The arm is to arrive one interval later (the time since the previous target,
        within [10 ms, `max_segment`]) moving at the targets' velocity (previous target -> this one;
        at rest for a first target). A stream that stops mid-motion stops at its last target."""
        q_goal = np.asarray(q_goal, float).reshape(-1)
        if q_goal.shape != (self.n,) or not np.isfinite(q_goal).all() or self._braking:
            self.counts["rejected"] += 1
            return False
        clipped = np.clip(q_goal, self._lo, self._hi)
        if not np.array_equal(clipped, q_goal):
            self.counts["clipped"] += 1
        last = self._last_target_t
        duration = self.max_segment if last is None else float(np.clip(t - last, 0.01, self.max_segment))
        if last is None or self._holding:  # a first target: arrive at rest
            self._goal_v = np.zeros(self.n)
        else:  # in a stream: arrive moving as the targets move (previous target -> this one)
            v_lo, v_hi = self.limits.velocity_bounds(clipped, scale=self.scale, **self._env)
            self._goal_v = np.clip((clipped - self._goal) / duration, v_lo, v_hi)
        self._goal, self._t_arrive, self._last_target_t = clipped, float(t) + duration, float(t)
        self._holding = False
        return True

    def brake(self) -> None:
        """Come to rest as fast as the limits allow and stay there; later targets are rejected."""
        self._braking = True

    @property
    def at_rest(self) -> bool:
        return bool(np.all(np.abs(self.v) < 1e-4) and np.all(np.abs(self.a) < 1e-2))

    def step(self, t: float) -> np.ndarray:
        """The command for robot time `t` (normally the previous one + dt; lost cycles are stepped
        through so the command stays on the planned trajectory). Returns the joint positions."""
        n_steps = int(np.clip(round((t - self.t) / self.dt), 1, 100))
        for _ in range(n_steps):
            self.t += self.dt
            self._advance()
        self.t = float(t)
        return self.q.copy()

    # ------------------------------------------------------------------------------------ internals
    def _plan(self) -> bool:
        from ruckig import Result, RuckigError

        try:
            return self._otg.update(self._inp, self._out) in (Result.Working, Result.Finished)
        except RuckigError:
            return False

    def _set_stop_target(self) -> None:
        """Set the planner's input to come to rest as fast as the limits allow (velocity interface)."""
        from ruckig import ControlInterface

        inp = self._inp
        inp.control_interface = ControlInterface.Velocity
        inp.target_velocity, inp.target_acceleration = np.zeros(self.n), np.zeros(self.n)
        inp.minimum_duration = None

    def _advance(self) -> None:
        from ruckig import ControlInterface

        inp, L = self._inp, self.limits
        inp.current_position, inp.current_velocity, inp.current_acceleration = self.q, self.v, self.a
        v_lo, v_hi = L.velocity_bounds(self.q, scale=self.scale, **self._env)
        # Ruckig wants a bound on each side; at a position limit 'no motion outward' is a tiny one
        inp.max_velocity, inp.min_velocity = np.maximum(v_hi, 1e-6), np.minimum(v_lo, -1e-6)
        stale = self._last_target_t is not None and self.t - self._last_target_t > self.stale_after
        if stale and not self._holding:
            self._holding = True
            self.counts["stale"] += 1
        if self._braking or self._holding:
            self._set_stop_target()
        else:
            # arrive with the targets' velocity on time; a late next target means: stop at this one
            remaining = self._t_arrive - self.t
            inp.control_interface = ControlInterface.Position
            inp.target_position = self._goal
            goal_v = self._goal_v if remaining > 0 else np.zeros(self.n)
            inp.target_velocity = np.clip(goal_v, inp.min_velocity, inp.max_velocity)
            inp.target_acceleration = np.zeros(self.n)
            inp.minimum_duration = remaining if remaining > 0 else None
        if not self._plan():
            # rare numerical corner case: Ruckig's step 1 fails when the commanded acceleration sits
            # exactly on its bound; 1 % more room (the official limit is still 1/scale away) solves it.
            # Failing that: a stop at the target, then a stop wherever the arm is. Counted either way.
            self.counts["planner_retries"] += 1
            inp.max_acceleration = (1.01 * self.scale * L.acceleration).tolist()
            ok = self._plan()
            if not ok:
                inp.target_velocity, inp.minimum_duration = np.zeros(self.n), None
                ok = self._plan()
            if not ok:
                # no position plan exists this cycle (seen on franky-sim under a policy; likely FR3's
                # position-dependent velocity bound below the current velocity): brake on the velocity
                # interface, which needs only the acceleration and jerk bounds; the next cycle plans
                # toward the target again
                self._set_stop_target()
                ok = self._plan()
            inp.max_acceleration = (self.scale * L.acceleration).tolist()
            if not ok:
                raise RuntimeError(f"ruckig: no trajectory from q={self.q}, v={self.v}, a={self.a} to {self._goal}")
        out = self._out
        self.q, self.v, self.a = np.array(out.new_position), np.array(out.new_velocity), np.array(out.new_acceleration)
