"""`protege record`: teleoperated demonstrations into a replay buffer ready for `protege train`.

The arm follows a teleop device (`teleop.py`) at a fixed rate on the robot's clock, through the same
`Controller` and `SafetyLayer` as `protege run`. The operator starts an episode (the task, when given,
resets the scene with seed `seed + k`, k = episodes saved so far), saves it (appended to the buffer:
`append_episode` commits it atomically, so a crash keeps every saved episode) or discards it, and ends
the session. Between episodes the arm holds. Every recorded step has the policy observation the task
defines (`obs/state`, cameras `obs/<name>` with capture times `camera/<name>_t`), the executed action
(the hold action when the safety layer rejected one), every declared robot field (`robot/<field>`),
the joint command, and with `instruction` the task string (`task` index 0, `attrs["tasks"]`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from protege.errors import ConfigError
from protege.hardware.base import Controller, EStop, SafetyLayer, make_action_space, policy_observation
from protege.runtime.recorder import Recorder

log = logging.getLogger("protege.runtime")


class TeleopRecorder:
    def __init__(self, robot: Any, device: Any, out: str, rate_hz: float, state_keys: list[str] | dict[str, list[str]],
                 task: Any = None, action_space: str | None = None, n_episodes: int | None = None, seed: int = 0,
                 max_steps: int | None = None, instruction: str | None = None, estop: EStop | None = None) -> None:
        if rate_hz <= 0:
            raise ConfigError(f"record: rate_hz must be > 0, got {rate_hz}")
        self.robot, self.device, self.task, self.seed = robot, device, task, int(seed)
        self.period, self.n_episodes, self.max_steps = 1.0 / rate_hz, n_episodes, max_steps
        self.state_keys, self.cameras = state_keys, list(getattr(robot, "cameras", ()))
        space = action_space or getattr(device, "action_space", None) or getattr(task, "action_space", None) or "ee_delta"
        self.space = make_action_space(space, robot.features)
        self.safety = SafetyLayer(robot.limits, self.period)
        self.estop = estop or EStop()
        attrs = {"provenance": {"source": "protege record", "robot": robot.name, "teleop": type(device).__name__},
                 "units": {"action": self.space.name}, **({"tasks": [instruction]} if instruction else {})}
        out_path = Path(out)
        self.recorder = Recorder(out_path, rate_hz, attrs)
        self.instruction = instruction
        self.saved = self._existing(out_path)

    @staticmethod
    def _existing(path: Path) -> int:
        """Episodes already in the buffer: a session appends, and seeds continue after them."""
        from protege.datasets.replay_buffer import ReplayBuffer

        return ReplayBuffer.open(path).n_episodes if path.exists() else 0

    def run(self) -> dict[str, Any]:
        robot, clock = self.robot, self.robot.clock
        controller = Controller(robot.kinematics, self.space, self.safety)
        counts = {"saved": 0, "discarded": 0, "steps": 0}
        recording, steps = False, 0
        self.device.start()
        try:
            with self.estop.signals():
                robot.connect()
                t_next = clock.now()
                while not self.estop.triggered:
                    clock.sleep_until(t_next)
                    t_next += self.period
                    obs = robot.read()
                    inp = self.device.read(recording)
                    if "quit" in inp.events:
                        break
                    if "discard" in inp.events and recording:
                        self.recorder.rows, recording = {}, False
                        counts["discarded"] += 1
                        log.info("record: episode discarded")
                    if ("save" in inp.events or (self.max_steps and steps >= self.max_steps)) and recording:
                        self.recorder.end_episode()
                        recording, counts["saved"] = False, counts["saved"] + 1
                        log.info("record: episode %d saved (%d steps)", self.saved + counts["saved"] - 1, steps)
                        if self.n_episodes and counts["saved"] >= self.n_episodes:
                            break
                    if "start" in inp.events and not recording:
                        self._start_episode(self.saved + counts["saved"], controller)
                        recording, steps = True, 0
                        # the scene (and simulated time) restarted at rest: the first step is now, and no
                        # hold goes through the safety layer first (it would make the first action's
                        # acceleration count from a standstill command, unlike the first step of an env)
                        t_next = clock.now()
                        continue
                    act = recording and inp.action is not None
                    cmd, fresh = controller(inp.action, obs) if act else (controller.hold(obs), False)
                    robot.command(cmd)
                    if act:
                        self._record(obs, inp.action if fresh else self.space.hold_action(obs, cmd), cmd, fresh)
                        steps += 1
                        counts["steps"] += 1
            if recording:
                counts["discarded"] += 1  # an episode in progress when the session ends is not saved
                log.warning("record: session ended during an episode; it was not saved")
        finally:
            self.device.stop()
            robot.stop()
        return {**counts, "episodes_in_buffer": self.saved + counts["saved"], "out": str(self.recorder.file),
                "safety_interventions": dict(self.safety.counts)}

    def _start_episode(self, k: int, controller: Controller) -> None:
        if self.task is not None and hasattr(self.robot, "reset_scene"):
            self.task.reset(self.robot, np.random.default_rng(self.seed + k))
        controller.reset()
        self.recorder.rows = {}
        log.info("record: episode %d started", k)

    def _record(self, obs: Any, action: np.ndarray, cmd: Any, fresh: bool) -> None:
        row: dict[str, Any] = {f"obs/{k}": v for k, v in policy_observation(obs, self.state_keys, []).items()}
        for cam in self.cameras:
            if obs.images.get(cam) is not None:
                row[f"obs/{cam}"] = obs.images[cam]
                row[f"camera/{cam}_t"] = np.float64(obs.image_t.get(cam) or np.nan)
        row.update({"action": np.asarray(action, np.float32), "robot/t": np.float64(obs.t), "command/q": cmd.q,
                    "command/gripper": np.asarray(cmd.gripper, np.float32), "teleop/rejected": np.uint8(not fresh)})
        row.update({f"robot/{k}": obs.get(k) for k in self.robot.features.state})
        if self.instruction:
            row["task"] = np.int64(0)
        self.recorder.add(row)


def record_from_config(cfg: Any) -> dict[str, Any]:
    """`protege record hardware=<...> teleop=<...> out=<buffer> [task=<name>] [...]`."""
    from omegaconf import OmegaConf

    from protege.envs import make_hardware_task
    from protege.runtime.runner import build_robot, check_state_fields
    from protege.runtime.teleop import make_teleop

    if not cfg.get("out"):
        raise ConfigError("protege record: expected out=<buffer path>")
    task, env, fps = None, {}, None
    if cfg.get("task") is not None:
        env = OmegaConf.to_container(cfg.task.get("env", {}), resolve=True)
        task = make_hardware_task(cfg.task.env_id, env)
        fps = float(env.get("control_hz", cfg.task.fps))
    state_keys = cfg.get("state_keys") or (task.state_keys if task is not None else None)
    if not state_keys:
        raise ConfigError("protege record: give task=<name> (its observation fields and scene) or state_keys=[...]")
    rate = float(cfg.get("rate_hz") or fps or 10.0)
    robot = build_robot(cfg.hardware, list(env.get("cameras", [])), env.get("image_size", 96),
                        getattr(task, "robot_options", None))
    try:  # the robot is closed whatever fails from here on (a refused field, a missing teleop device)
        check_state_fields(robot, state_keys, cfg.task.name if task is not None else None, "record")
        device = make_teleop(OmegaConf.to_container(cfg.teleop, resolve=True))
        if hasattr(device, "dt"):
            device.dt = 1.0 / rate
        rec = TeleopRecorder(robot, device, cfg.out, rate, state_keys, task,
                             cfg.get("action_space") or env.get("action_space"), cfg.get("n_episodes"),
                             int(cfg.get("seed", 0)), cfg.get("max_steps") or env.get("max_episode_steps"),
                             cfg.get("instruction") or env.get("instruction"))
        return rec.run()
    finally:
        robot.close()
