"""Simulated time for the MuJoCo robots (`mujoco_robot.py`, `aloha_robot.py`): one implementation.

Sim time is `n_physics_steps * timestep`, counted from the last scene reset. Two modes:

- `realtime=False` (as fast as possible): `clock` is a `SimClock`, whose `sleep_until(t)` steps the
  physics to t at once; runs are reproducible and match gymnasium evaluation step by step.
- `realtime=True`: `clock` is the monotonic wall clock, and every `read()` / camera `snapshot()`
  first steps the physics until sim time catches up with the wall time since the last reset (the
  command in force is held meanwhile, as on a position-controlled arm). There is no physics thread.

A re-entrant lock serialises physics, commands and camera snapshots (camera threads in real time).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from protege.hardware.base import MonotonicClock, RobotError


class SimClock:
    """Simulated time for as-fast-as-possible runs: sleeping advances the physics."""

    realtime = False

    def __init__(self, robot: SimulatedTime) -> None:
        self.robot = robot

    def now(self) -> float:
        return self.robot.sim_time

    def sleep_until(self, t: float) -> None:
        self.robot.advance_to(t)


class SimulatedTime:
    """Mixin for a MuJoCo robot's time. The robot sets `name`, `model`, `timestep`, `realtime` and
    `stopped`, calls `_init_time()` in its constructor, sets `data` in `connect()`, ends a scene reset
    with `_scene_ready(data)` and reads the state inside `with self._synced() as data:`. Override `_physics_steps` to act every physics step
    (e.g. joint impedance torques)."""

    name: str
    model: Any
    timestep: float
    realtime: bool
    stopped: bool

    def _init_time(self) -> None:
        self.clock: Any = MonotonicClock() if self.realtime else SimClock(self)
        self.data: Any = None
        self.n_physics_steps = 0
        self._lock = threading.RLock()  # physics, commands and camera snapshots (camera threads)

    @property
    def sim_time(self) -> float:
        return self.n_physics_steps * self.timestep

    def _scene_ready(self, d: Any) -> None:
        """End of a scene reset: forward the new state; sim time back to 0, anchored to the wall clock now."""
        import mujoco

        mujoco.mj_forward(self.model, d)
        self.t0, self.n_physics_steps = time.monotonic(), 0

    def _catch_up(self) -> None:
        """Real time: step the physics until sim time reaches the wall time since the last reset."""
        if self.realtime:
            self.advance_to(time.monotonic() - self.t0)

    @contextmanager
    def _synced(self) -> Iterator[Any]:
        """The simulation's data, under the lock, advanced to the wall clock in real time (`read()`)."""
        d = self._require()
        with self._lock:
            self._catch_up()
            yield d

    def advance_to(self, t: float) -> None:
        """Step the physics until sim time reaches `t` (holding the command in force)."""
        d = self._require()
        n = int(np.floor(t / self.timestep + 1e-9)) - self.n_physics_steps
        if n > 0:
            with self._lock:
                self._physics_steps(d, n)
                self.n_physics_steps += n

    def _physics_steps(self, d: Any, n: int) -> None:
        import mujoco

        mujoco.mj_step(self.model, d, nstep=n)

    def snapshot(self, data: Any) -> float:
        """Copy the simulation's poses (advanced to the wall clock in real time) into `data`, a camera
        thread's own MjData (see cameras.MujocoCamera); returns the snapshot's time on `clock`."""
        with self._lock:
            d = self._require()
            if not self.stopped:
                self._catch_up()
            data.qpos[:] = d.qpos
            data.mocap_pos[:] = d.mocap_pos
            data.mocap_quat[:] = d.mocap_quat
            return self.clock.now()

    def _require(self) -> Any:
        if self.data is None:
            raise RobotError(f"{self.name}: not connected (call connect() first)")
        return self.data
