"""Meta-World multi-task (MT10 by default) with one instruction per task, for language-conditioned policies.

One env holds a `MetaWorldEnv` per task; each reset draws a task from the seeded generator (or uses
the fixed `task` index). Observation `{"state": (39,), "task": index into env.tasks}` plus camera
images when asked; `info["instruction"]` and `info["task_name"]` name the episode's task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from protege.envs.metaworld import MetaWorldEnv, MetaWorldExpert
from protege.errors import ConfigError

# Meta-World's MT10 task list and an instruction for each (written here; Meta-World ships none).
MT10 = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}


class MetaWorldMultiTaskEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(self, task_names: Sequence[str] = tuple(MT10), task: int | None = None,
                 instructions: dict[str, str] | None = None, **env_kwargs: Any) -> None:
        instructions = {**MT10, **(instructions or {})}
        missing = [t for t in task_names if t not in instructions]
        if missing:
            raise ConfigError(f"metaworld_mt: no instruction for {missing}; pass task.env.instructions={{name: text}}")
        if task is not None and not 0 <= task < len(task_names):
            raise ConfigError(f"metaworld_mt: task={task}, expected an index in [0, {len(task_names)})")
        self.task_names = list(task_names)
        self.tasks = [instructions[t] for t in self.task_names]
        self.envs = [MetaWorldEnv(task=t, **env_kwargs) for t in self.task_names]
        self.fixed_task, self.task = task, 0
        self.render_mode = env_kwargs.get("render_mode")
        self.observation_space = gym.spaces.Dict({**self.envs[0].observation_space.spaces,
                                                  "task": gym.spaces.Discrete(len(self.tasks))})
        self.action_space = self.envs[0].action_space

    @property
    def env(self) -> MetaWorldEnv:
        return self.envs[self.task]

    def _info(self, info: dict[str, Any]) -> dict[str, Any]:
        return {**info, "instruction": self.tasks[self.task], "task_name": self.task_names[self.task]}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.task = self.fixed_task if self.fixed_task is not None else int(self.np_random.integers(len(self.tasks)))
        obs, info = self.env.reset(seed=None if seed is None else int(self.np_random.integers(2**31)))
        return {**obs, "task": np.int64(self.task)}, self._info(info)

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return {**obs, "task": np.int64(self.task)}, reward, terminated, truncated, self._info(info)

    def render(self) -> np.ndarray | None:
        return self.env.render()

    def close(self) -> None:
        for env in self.envs:
            env.close()


class MetaWorldMultiTaskExpert:
    """Meta-World's scripted policy of the episode's task."""

    def __init__(self, env: MetaWorldMultiTaskEnv, seed: int | None = None) -> None:
        self.env = env.unwrapped
        self.experts = [MetaWorldExpert(e, seed) for e in self.env.envs]

    def reset(self) -> None:
        pass

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self.experts[int(obs["task"])](obs)
