"""Meta-World v3 tasks (Sawyer arm, MuJoCo) by name, with Meta-World's own scripted experts.

We use the goal-observable variants (the 39-D state includes the goal) and re-randomise object and
goal positions at every reset, seeded by `reset(seed=...)` so collection and evaluation are
reproducible. Observation: `{"state": (39,) float32}` and, with `cameras`, `{<camera>: HxWx3 uint8}`;
with `proprio=True` also `{"proprio": (4,)}` = hand position + gripper opening (the first 4 state
entries): with a camera, what a policy that must find objects and goals in pixels gets.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from protege.errors import ConfigError


def task_names() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(ALL_V3_ENVIRONMENTS)


class MetaWorldEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(
        self,
        task: str = "push-v3",
        max_episode_steps: int = 200,
        cameras: tuple[str, ...] = (),
        image_size: int = 96,
        render_mode: str | None = None,
        render_camera: str = "corner",
        proprio: bool = False,
    ) -> None:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

        key = f"{task}-goal-observable"
        if key not in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE:
            import difflib

            close = difflib.get_close_matches(task, task_names(), n=3)
            raise ConfigError(f"unknown Meta-World task {task!r}; expected one of the v3 names, e.g. {close or task_names()[:5]}")
        self.task = task
        self.cameras = tuple(cameras)
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.render_camera = render_camera
        self.image_size = image_size
        self.proprio = proprio
        need_renderer = bool(self.cameras) or render_mode == "rgb_array"
        self._env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[key](render_mode="rgb_array" if need_renderer else None)
        self._env._freeze_rand_vec = False  # new object/goal positions at every reset
        self._env.seeded_rand_vec = True  # ... drawn from the env's own seeded generator
        if need_renderer:
            self._env.mujoco_renderer.width = self._env.mujoco_renderer.height = image_size
            self._visuals_set = False
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (39,), np.float32)}
        if proprio:
            spaces["proprio"] = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
        spaces.update({c: gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8) for c in self.cameras})
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.t = 0

    def _obs(self, state: np.ndarray) -> dict[str, np.ndarray]:
        obs = {"state": state.astype(np.float32)}
        if self.proprio:  # the expert still reads the full state; a camera policy reads only this
            obs["proprio"] = state[:4].astype(np.float32)
        for cam in self.cameras:
            obs[cam] = self._render(cam)
        return obs

    def _render(self, camera: str) -> np.ndarray:
        r = self._env.mujoco_renderer
        if not self._visuals_set:  # the viewer exists only once a GL context is needed
            _cheap_visuals(r)
            self._visuals_set = True
        r.camera_id = self._env.model.camera(camera).id
        return np.ascontiguousarray(r.render("rgb_array")[::-1])  # MuJoCo images are upside down

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(seed)
        state, _ = self._env.reset()
        self.t = 0
        return self._obs(state), {"success": False}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        state, reward, _, _, info = self._env.step(np.clip(action, -1.0, 1.0).astype(np.float64))
        self.t += 1
        success = bool(info["success"])
        return self._obs(state), float(reward), success, self.t >= self.max_episode_steps, {"success": success}

    def render(self) -> np.ndarray | None:
        return self._render(self.render_camera) if self.render_mode == "rgb_array" else None

    def close(self) -> None:
        self._env.close()


def _cheap_visuals(renderer: Any) -> None:
    """Small offscreen images: shadows, reflections and skybox cost most of the software-GL time."""
    import mujoco

    scene = renderer._get_viewer("rgb_array").scn
    for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX):
        scene.flags[flag] = 0


class MetaWorldExpert:
    """Meta-World's hand-written policy for the task (acts on the 39-D state)."""

    def __init__(self, env: MetaWorldEnv, seed: int | None = None) -> None:
        import warnings

        from metaworld.policies import ENV_POLICY_MAP

        # the experts' gains trip a "constants may be too high" warning on import; actions are clipped
        warnings.filterwarnings("ignore", message="Constant", module="metaworld")

        if env.task not in ENV_POLICY_MAP:
            raise ConfigError(f"Meta-World task {env.task!r} has no scripted expert")
        self.policy = ENV_POLICY_MAP[env.task]()

    def reset(self) -> None:
        pass

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.clip(self.policy.get_action(obs["state"].astype(np.float64)), -1.0, 1.0).astype(np.float32)
