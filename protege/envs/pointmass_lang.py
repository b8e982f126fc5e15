"""Language-conditioned point mass: four fixed goals, the instruction says which one to reach.

Observation `{"state": [x, y], "task": index into env.tasks}`; the goal is NOT in the state, so only
the instruction tells a policy where to go (from one start, four instructions mean four different
paths). `info["instruction"]` carries the string. `task=<i>` fixes the instruction (per-instruction
evaluation); by default each reset draws one from the seeded generator.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from protege.envs.pointmass import PointMassEnv

GOALS = {
    "move to the top left corner": (-0.6, 0.6),
    "move to the top right corner": (0.6, 0.6),
    "move to the bottom left corner": (-0.6, -0.6),
    "move to the bottom right corner": (0.6, -0.6),
}


class LanguagePointMassEnv(PointMassEnv):
    def __init__(self, task: int | None = None, min_start_distance: float = 0.4, **kwargs: Any) -> None:
        super().__init__(bimodal=False, **kwargs)
        self.tasks = list(GOALS)
        if task is not None and not 0 <= task < len(self.tasks):
            raise ValueError(f"task={task}: expected an index in [0, {len(self.tasks)})")
        self.fixed_task, self.min_start_distance = task, min_start_distance
        self.task = 0
        self.observation_space = gym.spaces.Dict({
            "state": gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            "task": gym.spaces.Discrete(len(self.tasks)),
        })

    @property
    def instruction(self) -> str:
        return self.tasks[self.task]

    def _obs(self) -> dict[str, Any]:
        return {"state": self.pos.astype(np.float32), "task": np.int64(self.task)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        gym.Env.reset(self, seed=seed)
        rng = self.np_random
        self.task = self.fixed_task if self.fixed_task is not None else int(rng.integers(len(self.tasks)))
        self.goal = np.array(GOALS[self.instruction], dtype=np.float64)
        self.pos = rng.uniform(-0.9, 0.9, 2)
        while np.linalg.norm(self.goal - self.pos) < self.min_start_distance:
            self.pos = rng.uniform(-0.9, 0.9, 2)
        self.t = 0
        self.trace = [self.pos.copy()]
        return self._obs(), {"success": False, "instruction": self.instruction}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        info = {"success": info["success"], "instruction": self.instruction}
        return obs, reward, terminated, truncated, info


class LanguagePointMassExpert:
    """Straight to the instructed goal (which the expert, unlike the policy, reads from the env)."""

    def __init__(self, env: LanguagePointMassEnv, seed: int | None = None) -> None:
        self.env = env

    def reset(self) -> None:
        pass

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        env = self.env.unwrapped
        delta = (env.goal - obs["state"].astype(np.float64)) / env.max_step
        return (delta / max(np.linalg.norm(delta), 1.0)).astype(np.float32)
