"""A 2-D point mass: the smallest task that still shows what a policy class can and cannot learn.

- `pointmass`: reach a random goal from a random start (goal in the observation).
- `pointmass_image_goal`: the same, but the state holds only the agent's position: the goal is seen
  in the `top` camera and nowhere else, so a policy succeeds only if it reads the goal from pixels.
- `pointmass_bimodal`: from the left, reach a fixed goal on the right around a disc obstacle. The
  expert flips a coin per episode to pass above or below, so the demonstrations hold two equally
  good routes and no observation tells which: MSE regression averages them (into the obstacle),
  a generative policy such as Diffusion Policy should use both.

Observation `{"state": [x, y, goal_x, goal_y]}` (`[x, y]` with `goal_in_state=False`) (+ `{"top": (n, n, 3)
uint8}` with `cameras=("top",)`, a top-down picture drawn with numpy: image policies can be tested with
no GL at all), action: velocity in [-1, 1]^2 (times `max_step`). Discs are drawn anti-aliased with a
radius of at least `min_radius_px`, so at 32x32 the agent is always visible and its sub-pixel position
shows in the edge intensities (a hard-edged 0.6-pixel disc could vanish between pixel centres).
Entering the obstacle is refused (the point stays where it was).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

OBSTACLE_CENTER = np.array([0.0, 0.0])
OBSTACLE_RADIUS = 0.35
ROUTE_Y = 0.55  # the expert's waypoint height above/below the obstacle


class PointMassEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        bimodal: bool = False,
        max_step: float = 0.05,
        goal_tolerance: float = 0.05,
        max_episode_steps: int = 80,
        render_mode: str | None = None,
        image_size: int = 96,
        cameras: tuple[str, ...] = (),
        goal_in_state: bool = True,
        min_radius_px: float = 1.2,
    ) -> None:
        if set(cameras) - {"top"}:
            raise ValueError(f"point-mass cameras: only 'top' exists, got {list(cameras)}")
        self.bimodal = bimodal
        self.max_step, self.goal_tolerance, self.max_episode_steps = max_step, goal_tolerance, max_episode_steps
        self.render_mode, self.image_size = render_mode, image_size
        self.cameras = tuple(cameras)
        self.goal_in_state, self.min_radius_px = goal_in_state, min_radius_px
        if not goal_in_state and not self.cameras:
            raise ValueError("point mass with goal_in_state=False needs cameras=('top',): nothing else shows the goal")
        spaces = {"state": gym.spaces.Box(-1.0, 1.0, (4 if goal_in_state else 2,), np.float32)}
        spaces.update({c: gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8) for c in self.cameras})
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.pos = np.zeros(2)
        self.goal = np.zeros(2)
        self.t = 0
        self.trace: list[np.ndarray] = []

    def _obs(self) -> dict[str, np.ndarray]:
        state = np.concatenate([self.pos, self.goal]) if self.goal_in_state else self.pos
        obs = {"state": state.astype(np.float32)}
        obs.update({c: self._draw(trace=False) for c in self.cameras})
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        rng = self.np_random
        if self.bimodal:
            # y exactly 0: nothing in the observation may hint at which route to take
            self.pos = np.array([rng.uniform(-0.9, -0.7), 0.0])
            self.goal = np.array([0.8, 0.0])
        else:
            self.pos = rng.uniform(-0.9, 0.9, 2)
            self.goal = rng.uniform(-0.9, 0.9, 2)
            while np.linalg.norm(self.goal - self.pos) < 0.5:
                self.goal = rng.uniform(-0.9, 0.9, 2)
        self.t = 0
        self.trace = [self.pos.copy()]
        return self._obs(), {"success": False}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        new = np.clip(self.pos + self.max_step * action, -1.0, 1.0)
        if not (self.bimodal and np.linalg.norm(new - OBSTACLE_CENTER) < OBSTACLE_RADIUS):
            self.pos = new
        self.t += 1
        self.trace.append(self.pos.copy())
        dist = float(np.linalg.norm(self.goal - self.pos))
        success = dist < self.goal_tolerance
        info = {"success": success, "route": self.route(), "distance": dist}  # final distance lands in eval.json
        return self._obs(), -dist, success, self.t >= self.max_episode_steps, info

    def route(self) -> str:
        """'up' or 'down': the side of the obstacle the path passed (by its extreme y), else 'none'."""
        ys = np.array(self.trace)[:, 1]
        y = ys.max() if ys.max() > -ys.min() else ys.min()
        return "up" if y > OBSTACLE_RADIUS else "down" if y < -OBSTACLE_RADIUS else "none"

    def render(self) -> np.ndarray | None:
        return self._draw(trace=True) if self.render_mode == "rgb_array" else None

    def _draw(self, trace: bool) -> np.ndarray:
        n = self.image_size
        img = np.full((n, n, 3), 255.0)
        yy, xx = np.mgrid[0:n, 0:n]
        to_px = lambda p: ((p[0] + 1) / 2 * (n - 1), (1 - p[1]) / 2 * (n - 1))  # noqa: E731

        def disc(p: np.ndarray, r: float, color: tuple[int, int, int]) -> None:
            cx, cy = to_px(p)
            r_px = max(r * (n - 1) / 2, self.min_radius_px)
            cover = np.clip(r_px + 0.5 - np.hypot(xx - cx, yy - cy), 0.0, 1.0)[..., None]  # ~pixel area inside
            img[:] = img * (1 - cover) + np.asarray(color, np.float64) * cover

        if self.bimodal:
            disc(OBSTACLE_CENTER, OBSTACLE_RADIUS, (90, 90, 90))
        disc(self.goal, 0.06, (40, 170, 40))
        for p in self.trace if trace else []:
            disc(p, 0.015, (120, 120, 230))
        disc(self.pos, 0.04, (220, 40, 40))
        return np.rint(img).astype(np.uint8)


class PointMassExpert:
    """Straight to the goal; in the bimodal variant via a waypoint above or below (coin flip)."""

    def __init__(self, env: PointMassEnv, seed: int | None = None) -> None:
        self.env = env
        self.rng = np.random.default_rng(seed)
        self.waypoints: list[np.ndarray] = []

    def reset(self) -> None:
        side = 1.0 if self.rng.random() < 0.5 else -1.0
        self.waypoints = [np.array([0.0, side * ROUTE_Y])] if self.env.bimodal else []

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        # the goal from the env, not the observation: with goal_in_state=False only the camera shows it
        pos, goal = obs["state"][:2].astype(np.float64), self.env.unwrapped.goal.astype(np.float64)
        if self.waypoints and np.linalg.norm(self.waypoints[0] - pos) < 0.1:
            self.waypoints.pop(0)
        target = self.waypoints[0] if self.waypoints else goal
        delta = (target - pos) / self.env.max_step
        norm = np.linalg.norm(delta)
        return (delta / max(norm, 1.0)).astype(np.float32)
