"""Teleoperation devices for `protege record`: each tick a device gives an action (or None: hold) and the
operator's events (`start`, `save`, `discard`, `quit`).

- `KeyboardTeleop`: the terminal in cbreak mode (no display needed, works over ssh): w/s, a/d, r/f move
  the end effector along x, y, z by `step` m per key press; g toggles the gripper; space starts an
  episode, Enter saves it, Backspace (or x) discards it, q (or Esc) ends the session.
- `SpaceMouseTeleop`: a 3Dconnexion SpaceMouse through `pyspacemouse` (maintained HID library, imported
  lazily): translation -> end-effector velocity (`speed` m/s at full deflection); button 0 toggles the
  gripper, button 1 starts an episode and, pressed again, saves it.
- `ReplayTeleop`: plays the actions of a replay buffer's episodes (start, every action, save; quit after
  the last): tests, and re-recording demonstrations on another robot or with cameras.
"""

from __future__ import annotations

import os
import select
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protege.errors import ConfigError, ProtegeError

EVENTS = ("start", "save", "discard", "quit")


class TeleopError(ProtegeError):
    """A teleoperation device cannot be used (library or device missing, not a terminal)."""


@dataclass
class TeleopInput:
    action: np.ndarray | None  # in the device's action space (None: hold)
    events: list[str] = field(default_factory=list)


class ReplayTeleop:
    """The actions of `path`'s episodes (`episodes`: which ones, default all), one per tick."""

    action_space: str | None = None  # from the buffer's units, unless set

    def __init__(self, path: str, episodes: list[int] | None = None, action_space: str | None = None) -> None:
        from protege.datasets.replay_buffer import ReplayBuffer

        buf = ReplayBuffer.open(path)
        self.path = str(path)
        idx = list(range(buf.n_episodes)) if episodes is None else list(episodes)
        bad = [i for i in idx if not 0 <= i < buf.n_episodes]
        if bad:
            raise ConfigError(f"teleop.episodes: {path} has {buf.n_episodes} episodes, asked for {bad}")
        actions = np.asarray(buf["action"][: buf.n_steps])
        self.episodes = [actions[buf.episode_slice(i)] for i in idx]
        self.action_space = action_space or buf.attrs.get("units", {}).get("action")
        self.ep, self.t = 0, -1  # t = -1: the episode has not started

    def start(self) -> None:
        pass

    def read(self, recording: bool) -> TeleopInput:
        if self.ep >= len(self.episodes):
            return TeleopInput(None, ["quit"])
        if self.t < 0:
            self.t = 0
            return TeleopInput(None, ["start"])
        ep = self.episodes[self.ep]
        if self.t >= len(ep):
            self.ep, self.t = self.ep + 1, -1
            return TeleopInput(None, ["save"])
        self.t += 1
        return TeleopInput(ep[self.t - 1].astype(np.float64))

    def stop(self) -> None:
        pass


class KeyboardTeleop:
    """End-effector deltas from key presses in the terminal (`ee_delta`: [dx, dy, dz, gripper width])."""

    action_space = "ee_delta"
    MOVES = {"w": (0, 1), "s": (0, -1), "a": (1, 1), "d": (1, -1), "r": (2, 1), "f": (2, -1)}
    KEYS = {" ": "start", "\n": "save", "\r": "save", "\x7f": "discard", "x": "discard", "q": "quit", "\x1b": "quit"}

    def __init__(self, step: float = 0.01, gripper_open: float = 0.08, gripper_closed: float = 0.0,
                 fd: int | None = None) -> None:
        self.step, self.open, self.closed = float(step), float(gripper_open), float(gripper_closed)
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.gripper = self.open
        self._keys: list[str] = []
        self._lock = threading.Lock()
        self._running = False
        self._old: Any = None

    def start(self) -> None:
        import termios
        import tty

        if not os.isatty(self.fd):
            raise TeleopError("teleop=keyboard needs a terminal on stdin (it reads key presses in cbreak mode)")
        self._old = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)  # keys arrive one by one, unechoed; Ctrl-C still raises SIGINT
        self._running = True
        self._thread = threading.Thread(target=self._read_keys, name="teleop-keyboard", daemon=True)
        self._thread.start()
        print("keyboard teleop: w/s a/d r/f move x/y/z, g gripper, space start, Enter save, "
              "Backspace/x discard, q end", file=sys.stderr)

    def _read_keys(self) -> None:
        while self._running:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                chunk = os.read(self.fd, 64).decode(errors="ignore")
                with self._lock:
                    self._keys.extend(chunk)

    def read(self, recording: bool) -> TeleopInput:
        with self._lock:
            keys, self._keys = self._keys, []
        delta, events = np.zeros(3), []
        for k in keys:
            if k in self.MOVES:
                axis, sign = self.MOVES[k]
                delta[axis] += sign * self.step
            elif k == "g":
                self.gripper = self.closed if self.gripper == self.open else self.open
            elif k in self.KEYS:
                events.append(self.KEYS[k])
        return TeleopInput(np.array([*delta, self.gripper]), events)

    def stop(self) -> None:
        import termios

        self._running = False
        thread = getattr(self, "_thread", None)
        if thread is not None:  # let the reader leave select() before the caller may close the fd
            thread.join(timeout=1.0)
        if self._old is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._old)
            self._old = None


class SpaceMouseTeleop:
    """End-effector deltas from a SpaceMouse: `speed` m/s at full deflection, one tick = `dt` s."""

    action_space = "ee_delta"

    def __init__(self, speed: float = 0.15, dt: float = 0.1, deadzone: float = 0.05, gripper_open: float = 0.08,
                 gripper_closed: float = 0.0, axes: tuple[int, int, int] = (1, 0, 2),
                 signs: tuple[float, float, float] = (1.0, -1.0, 1.0)) -> None:
        self.speed, self.dt, self.deadzone = float(speed), float(dt), float(deadzone)
        self.open, self.closed, self.gripper = float(gripper_open), float(gripper_closed), float(gripper_open)
        self.axes, self.signs = tuple(axes), np.asarray(signs, float)  # device (x, y, z) -> robot (x, y, z)
        self.device: Any = None
        self._buttons = [0, 0]

    def start(self) -> None:
        try:
            import pyspacemouse
        except (ImportError, OSError) as e:  # OSError: easyhid could not load libhidapi
            raise TeleopError(f"teleop=spacemouse needs pyspacemouse and libhidapi (pip install pyspacemouse; "
                              f"apt-get install libhidapi-hidraw0): {e}") from e
        try:
            found = pyspacemouse.get_connected_devices()
        except Exception as e:  # noqa: BLE001 - the HID layer's own errors
            raise TeleopError(f"teleop=spacemouse: cannot list HID devices: {e}") from e
        if not found:
            raise TeleopError("teleop=spacemouse: no SpaceMouse connected (is it plugged in, and is /dev/hidraw* readable?)")
        self.device = pyspacemouse.open()

    def read(self, recording: bool) -> TeleopInput:
        s = self.device.read()
        raw = np.array([s.x, s.y, s.z], float)
        raw[np.abs(raw) < self.deadzone] = 0.0
        delta = self.signs * raw[list(self.axes)] * self.speed * self.dt
        buttons, events = list(getattr(s, "buttons", [0, 0]))[:2] + [0, 0], []
        if buttons[0] and not self._buttons[0]:  # rising edges only
            self.gripper = self.closed if self.gripper == self.open else self.open
        if buttons[1] and not self._buttons[1]:
            events.append("save" if recording else "start")
        self._buttons = buttons[:2]
        return TeleopInput(np.array([*delta, self.gripper]), events)

    def stop(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None


DEVICES: dict[str, type] = {"keyboard": KeyboardTeleop, "spacemouse": SpaceMouseTeleop, "replay": ReplayTeleop}


def make_teleop(cfg: dict[str, Any]) -> Any:
    """A device from its config: `{device: keyboard|spacemouse|replay, <options>}`."""
    cfg = dict(cfg)
    kind = cfg.pop("device", None)
    if kind not in DEVICES:
        raise ConfigError(f"teleop.device: expected one of {sorted(DEVICES)}, got {kind!r}")
    try:
        return DEVICES[kind](**cfg)
    except TypeError as e:
        raise ConfigError(f"teleop ({kind}): {e}") from e
