"""Franka Panda tasks on the MuJoCo backend, as gymnasium envs, with scripted experts.

The env is a thin shell over the hardware layer: a `MujocoRobot` stepped as fast as possible, the
same `Controller` (action space -> IK -> safety) and the same `FrankaTask` (scene reset, policy
observation, success) that `protege run` uses on the MuJoCo robot. Training, gymnasium evaluation
and the real-time runner therefore execute one code path.

Tasks (10 Hz, action `ee_delta` = [dx, dy, dz, gripper width] in metres, gripper pointing down):
- `reach`: bring the end effector within 3 cm of a random goal point above the table.
  state = [ee_pos, goal_pos].
- `push`: push the cube on the table to within 3 cm of a random goal on the table.
  state = [ee_pos, cube_pos, goal_pos].
- `pick_place`: grasp the cube and bring it within 3 cm of a random goal point in the air.
  state = [ee_pos, gripper, cube_pos, goal_pos].
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from protege.errors import ConfigError
from protege.hardware.base import Controller, Observation, SafetyLayer, make_action_space, policy_observation
from protege.hardware.panda import GRIPPER_MAX, HOME_Q


class FrankaTask:
    name = ""
    state_keys: list[str] = []
    max_episode_steps = 50

    def reset(self, robot: Any, rng: np.random.Generator) -> None:
        raise NotImplementedError

    def success(self, obs: Observation) -> bool:
        raise NotImplementedError


class Reach(FrankaTask):
    name, state_keys, max_episode_steps = "reach", ["ee_pos", "goal_pos"], 40
    tolerance = 0.03

    def reset(self, robot: Any, rng: np.random.Generator) -> None:
        goal = rng.uniform([0.35, -0.25, 0.08], [0.65, 0.25, 0.4])
        robot.reset_scene(HOME_Q, cube_pos=np.array([0.5, 0.35, 0.025]), goal_pos=goal)

    def success(self, obs: Observation) -> bool:
        return bool(np.linalg.norm(obs.ee_pos - obs.extra["goal_pos"]) < self.tolerance)


class Push(FrankaTask):
    name, state_keys, max_episode_steps = "push", ["ee_pos", "cube_pos", "goal_pos"], 80
    tolerance = 0.03

    def reset(self, robot: Any, rng: np.random.Generator) -> None:
        cube = np.array([*rng.uniform([0.42, -0.1], [0.55, 0.1]), 0.025])
        angle = rng.uniform(-np.pi / 3, np.pi / 3) + (np.pi if rng.random() < 0.5 else 0.0)
        goal = cube + np.array([np.sin(angle), np.cos(angle), 0.0]) * rng.uniform(0.1, 0.15)
        goal[2] = 0.005
        robot.reset_scene(HOME_Q, cube_pos=cube, goal_pos=goal)

    def success(self, obs: Observation) -> bool:
        return bool(np.linalg.norm(obs.extra["cube_pos"][:2] - obs.extra["goal_pos"][:2]) < self.tolerance)


class PickPlace(FrankaTask):
    name, state_keys, max_episode_steps = "pick_place", ["ee_pos", "gripper", "cube_pos", "goal_pos"], 100
    tolerance = 0.03

    def reset(self, robot: Any, rng: np.random.Generator) -> None:
        cube = np.array([*rng.uniform([0.42, -0.15], [0.58, 0.15]), 0.025])
        goal = np.array([*rng.uniform([0.42, -0.2], [0.58, 0.2]), rng.uniform(0.1, 0.25)])
        while np.linalg.norm(goal[:2] - cube[:2]) < 0.1:
            goal[:2] = rng.uniform([0.42, -0.2], [0.58, 0.2])
        robot.reset_scene(HOME_Q, cube_pos=cube, goal_pos=goal)

    def success(self, obs: Observation) -> bool:
        return bool(np.linalg.norm(obs.extra["cube_pos"] - obs.extra["goal_pos"]) < self.tolerance)


TASKS: dict[str, type[FrankaTask]] = {"reach": Reach, "push": Push, "pick_place": PickPlace}


def make_task(name: str) -> FrankaTask:
    if name not in TASKS:
        raise ConfigError(f"unknown Franka task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]()


class FrankaEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        task: str = "reach",
        control_hz: float = 10.0,
        action_space: str = "ee_delta",
        cameras: tuple[str, ...] | list[str] = (),
        image_size: int = 96,
        max_episode_steps: int | None = None,
        control: str = "position",
        render_mode: str | None = None,
        render_camera: str = "front",
        instruction: str | None = None,
    ) -> None:
        """`instruction`: make the task language-labelled: `tasks = [instruction]` and a `task` observation
        (always 0), so demos carry the text and a VLA can be trained and run on it."""
        from protege.hardware.mujoco_robot import MujocoRobot

        self.task = make_task(task)
        self.cameras = list(cameras)
        self.dt = 1.0 / control_hz
        self.max_episode_steps = max_episode_steps or self.task.max_episode_steps
        self.render_mode, self.render_camera = render_mode, render_camera
        self.robot = MujocoRobot(realtime=False, control=control, cameras=tuple(self.cameras), image_size=image_size)
        self.robot.connect()
        self.controller = Controller(self.robot.kinematics, make_action_space(action_space, self.robot.features), SafetyLayer(self.robot.limits, self.dt))
        obs = self.robot.read()
        dim = len(policy_observation(obs, self.task.state_keys, [])["state"])
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)}
        spaces.update({c: gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8) for c in self.cameras})
        self.tasks = [instruction] if instruction else []
        if self.tasks:
            spaces["task"] = gym.spaces.Discrete(1)
        self.observation_space = gym.spaces.Dict(spaces)
        n = self.controller.space.dim
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (n,), np.float32)
        self._obs: Observation = obs
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.task.reset(self.robot, self.np_random)
        self.controller.reset()
        self.t = 0
        self._obs = self.robot.read()
        return self._policy_obs(), {"success": False}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        cmd, _ = self.controller(action, self._obs)
        self.robot.command(cmd)
        self.robot.clock.sleep_until(self._obs.t + self.dt)
        self._obs = self.robot.read()
        self.t += 1
        success = self.task.success(self._obs)
        return self._policy_obs(), float(success), success, self.t >= self.max_episode_steps, {"success": success}

    def _policy_obs(self) -> dict[str, np.ndarray]:
        obs = policy_observation(self._obs, self.task.state_keys, self.cameras)
        if self.tasks:
            obs["task"] = np.int64(0)
        return obs

    @property
    def robot_obs(self) -> Observation:
        return self._obs

    def render(self) -> np.ndarray | None:
        return self.robot.render(self.render_camera) if self.render_mode == "rgb_array" else None

    def close(self) -> None:
        self.robot.close()


PUSH_Z = 0.07
GRASP_DZ = 0.045  # end-effector site above the cube centre when the fingertips enclose it


class FrankaExpert:
    """Scripted expert for the Franka tasks, acting on the env's robot observation (privileged
    positions), with end-effector steps of at most `max_step` m."""

    def __init__(self, env: FrankaEnv, seed: int | None = None, max_step: float = 0.04) -> None:
        self.env, self.max_step = env, max_step
        self.phase = 0

    def reset(self) -> None:
        self.phase = 0

    def _toward(self, ee: np.ndarray, target: np.ndarray, grip: float) -> np.ndarray:
        d = target - ee
        n = np.linalg.norm(d)
        if n > self.max_step:
            d *= self.max_step / n
        return np.array([*d, grip], np.float32)

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        o = self.env.unwrapped.robot_obs
        ee, goal = o.ee_pos, o.extra["goal_pos"]
        if self.env.unwrapped.task.name == "reach":
            return self._toward(ee, goal, GRIPPER_MAX)
        if self.env.unwrapped.task.name == "pick_place":
            return self._pick_place(o, ee, goal)
        # push: go behind the cube (seen from the goal), descend, push through to the goal
        cube = o.extra["cube_pos"]
        direction = goal[:2] - cube[:2]
        direction /= max(np.linalg.norm(direction), 1e-9)
        # the end-effector site sits ~5 cm above the fingertips: z = PUSH_Z puts them 2 cm above the table
        behind = np.array([*(cube[:2] - direction * 0.07), PUSH_Z])
        if self.phase == 0:  # above the pre-push point
            target = behind + [0, 0, 0.08]
            if np.linalg.norm(ee[:2] - target[:2]) < 0.01:
                self.phase = 1
        if self.phase == 1:  # down to pushing height
            target = behind
            if ee[2] < PUSH_Z + 0.01:
                self.phase = 2
        if self.phase == 2:  # push: aim the cube centre at the goal, keep the fingertips low
            lateral = cube[:2] - (ee[:2] + direction * 0.05)
            target = np.array([*(goal[:2] - direction * 0.04 + 0.5 * lateral), PUSH_Z])
            if np.linalg.norm(lateral) > 0.03:  # lost the cube: back off and line up again
                self.phase = 0
        return self._toward(ee, target, 0.0)

    def _pick_place(self, o: Observation, ee: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """Above the cube (open) -> down -> close -> lift -> carry to the goal."""
        cube = o.extra["cube_pos"]
        grasp = np.array([cube[0], cube[1], cube[2] + GRASP_DZ])
        if self.phase == 0:  # above the cube, open
            target, grip = grasp + [0, 0, 0.1], GRIPPER_MAX
            if np.linalg.norm(ee[:2] - target[:2]) < 0.008:
                self.phase = 1
        if self.phase == 1:  # down around it
            target, grip = grasp, GRIPPER_MAX
            if abs(ee[2] - grasp[2]) < 0.008:
                self.phase, self.t_close = 2, 0
        if self.phase == 2:  # close and wait for the fingers
            target, grip = grasp, 0.0
            self.t_close += 1
            if self.t_close >= 4:
                self.phase = 3
        if self.phase == 3:  # carry (the cube hangs GRASP_DZ below the end effector)
            target, grip = goal + [0, 0, GRASP_DZ], 0.0
            if cube[2] < 0.015 + 0.025 and ee[2] > grasp[2] + 0.05:  # dropped it: start over
                self.phase = 0
        return self._toward(ee, target, grip)
