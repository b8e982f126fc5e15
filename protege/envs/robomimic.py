"""robomimic tasks in robosuite, built by robomimic's own env utilities from a dataset's `env_args`.

`RobomimicEnv(dataset=<buffer or robomimic hdf5>)` reads the `env_args` the dataset was recorded with
(a converted buffer keeps them in `attrs["robomimic"]["env_args"]`) and creates the env with
`robomimic.utils.env_utils.create_env_from_metadata`, the reference implementation of that metadata;
`RobomimicEnv(env_name="Lift")` uses the env_args our scripted experts record (robosuite's default
Panda OSC_POSE controller at 20 Hz, as robomimic's datasets). Observations are robomimic's keys
(`object`, `robot0_eef_pos`, ..., `<camera>_image` as uint8 HWC), stored in a buffer as `obs/<key>`
like the robomimic adapter does; `info["success"]` is the env's own success check, and an episode
terminates on success (robomimic's rollouts stop there too).

`hard_reset=False` (`task.env.hard_reset=false`) sets robosuite's own `hard_reset` flag: a reset then
restores the compiled MuJoCo model instead of rebuilding and recompiling it from XML (~0.6 s per reset
for Lift, most of a scripted episode's time; measured 4.6x faster expert episodes). Initial states come
from the same samplers (cube placement, robot joint noise) but a given seed draws a different state than
with the default hard reset, so seeds are comparable only within one setting. It is a run-time setting,
not part of the recorded `env_args` (robomimic's own rollouts of an exported file still hard-reset).

robosuite and robomimic are imported on first use: the rest of the toolkit runs without them.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from protege.errors import ConfigError, DataError

ROBOSUITE_TYPE = 1  # robomimic's EnvType.ROBOSUITE_TYPE


def _env_utils() -> tuple[Any, Any]:
    """robomimic's EnvUtils and ObsUtils. robomimic 0.3.0 (the newest release on PyPI) imports
    mujoco_py in its robosuite wrapper only to name the exception its rollouts catch; robosuite 1.5
    runs on the `mujoco` bindings, so without mujoco_py that name is given mujoco's own error."""
    try:
        import robosuite  # noqa: F401
    except ImportError as e:
        raise ConfigError("robomimic tasks need robosuite and robomimic: pip install robosuite==1.5.2 "
                          "robomimic==0.3.0 --no-deps (see scripts/setup.sh)") from e
    try:
        import mujoco_py  # noqa: F401
    except ImportError:
        import mujoco

        sys.modules["mujoco_py"] = types.SimpleNamespace(builder=types.SimpleNamespace(MujocoException=mujoco.FatalError))
    import robomimic.utils.env_utils as env_utils
    import robomimic.utils.obs_utils as obs_utils

    return env_utils, obs_utils


def default_env_args(env_name: str) -> dict[str, Any]:
    """The env_args our scripted experts record: robomimic's robosuite settings for its datasets."""
    import robosuite
    from robosuite.controllers import load_composite_controller_config

    return {"env_name": env_name, "env_version": robosuite.__version__, "type": ROBOSUITE_TYPE, "env_kwargs": {
        "robots": ["Panda"], "controller_configs": load_composite_controller_config(controller="BASIC", robot="Panda"),
        "control_freq": 20, "reward_shaping": False, "camera_names": ["agentview", "robot0_eye_in_hand"],
        "camera_heights": 84, "camera_widths": 84, "camera_depths": False, "use_object_obs": True}}


def env_args_from_dataset(path: str | Path) -> dict[str, Any]:
    """`env_args` of a converted replay buffer (attrs) or of a robomimic hdf5 file (data.attrs)."""
    path = Path(path)
    if path.suffix in (".hdf5", ".h5"):
        import h5py

        with h5py.File(path, "r") as f:
            raw = f["data"].attrs.get("env_args") if "data" in f else None
        args = json.loads(raw) if raw else None
    else:
        from protege.datasets.replay_buffer import ReplayBuffer

        args = ReplayBuffer.open(path).attrs.get("robomimic", {}).get("env_args")
    if not args or not args.get("env_name"):
        raise DataError(path, "env_args", "robomimic env metadata (env_name, type, env_kwargs): a robomimic hdf5 "
                        "or a buffer converted from one / collected with task=robomimic_*", repr(args))
    return args


def checked_env_args(env_args: dict[str, Any], source: str | Path, cameras: tuple[str, ...], image_size: int) -> dict[str, Any]:
    """A copy of `env_args` for this robosuite: env checked, cameras set, an old controller config converted."""
    import robosuite

    env_args = json.loads(json.dumps(env_args))
    if env_args.get("type", ROBOSUITE_TYPE) != ROBOSUITE_TYPE:
        raise DataError(source, "env_args/type", f"{ROBOSUITE_TYPE} (a robosuite env)", repr(env_args.get("type")))
    if env_args["env_name"] not in robosuite.ALL_ENVIRONMENTS:
        raise DataError(source, "env_args/env_name", f"an env robosuite {robosuite.__version__} has "
                        f"(e.g. {', '.join(sorted(robosuite.ALL_ENVIRONMENTS)[:6])}, ...)", repr(env_args["env_name"]))
    kwargs = env_args["env_kwargs"]
    if cameras:
        kwargs.update(camera_names=list(cameras), camera_heights=image_size, camera_widths=image_size)
    kwargs.pop("has_renderer", None)  # robomimic sets the renderer flags from its own arguments
    if kwargs.get("controller_configs"):  # datasets recorded with robosuite <= 1.4 hold one arm's config
        from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

        robot = kwargs.get("robots", "Panda")
        robot = robot[0] if isinstance(robot, list) else robot
        kwargs["controller_configs"] = refactor_composite_controller_config(kwargs["controller_configs"], robot, ["right"])
    return env_args


class RobomimicEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        dataset: str | None = None,
        env_name: str | None = None,
        env_args: dict[str, Any] | None = None,
        cameras: tuple[str, ...] = (),
        image_size: int = 84,
        max_episode_steps: int = 400,
        render_mode: str | None = None,
        render_camera: str = "agentview",
        render_size: int = 256,
        hard_reset: bool = True,
    ) -> None:
        if env_args is None and dataset is None and env_name is None:
            raise ConfigError("task=robomimic needs dataset=<converted robomimic buffer or robomimic hdf5>")
        env_utils, obs_utils = _env_utils()
        env_args = env_args or (env_args_from_dataset(dataset) if dataset else default_env_args(env_name))
        env_args = checked_env_args(env_args, dataset or "env_args", tuple(cameras), image_size)
        self.cameras = tuple(cameras)
        image_keys = [f"{c}_image" for c in self.cameras]
        obs_utils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": [], "rgb": image_keys}})  # global registry
        self.rm_env = env_utils.create_env_from_metadata(env_meta=env_args, render=False,
                                                         render_offscreen=render_mode == "rgb_array" or bool(self.cameras),
                                                         use_image_obs=bool(self.cameras))
        self.rm_env.postprocess_visual_obs = False  # keep uint8 HWC frames (robomimic would make float CHW)
        self.env_args = self.rm_env.serialize()  # before hard_reset is set: it stays out of the env_args
        self.rm_env.env.hard_reset = bool(hard_reset)  # robosuite reads it on every reset (see module doc)
        self.max_episode_steps = max_episode_steps
        # robosuite's offscreen context is sized by the first render: frames larger than the camera
        # observations come out as garbage, so a video of a camera task is rendered at their size
        self.render_size = image_size if self.cameras else render_size
        self.render_mode, self.render_camera = render_mode, render_camera
        obs = self._obs(self.rm_env.reset())
        self.observation_space = gym.spaces.Dict({
            k: gym.spaces.Box(0, 255, v.shape, np.uint8) if v.dtype == np.uint8 else gym.spaces.Box(-np.inf, np.inf, v.shape, np.float32)
            for k, v in obs.items()})
        low, high = self.rm_env.env.action_spec
        self.action_space = gym.spaces.Box(low.astype(np.float32), high.astype(np.float32))
        self._t = 0

    @property
    def buffer_attrs(self) -> dict[str, Any]:
        """What `protege collect` stores beside the demos: the env_args, as the robomimic adapter does."""
        return {"robomimic": {"env_args": self.env_args, "mask": {}, "total": -1}}

    def _obs(self, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) if np.asarray(v).dtype == np.uint8 else np.asarray(v, np.float32) for k, v in raw.items()}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
        super().reset(seed=seed)
        if seed is not None:  # robosuite samples object placements from env.rng (shared with its samplers): reseed in place
            self.rm_env.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self._t = 0
        return self._obs(self.rm_env.reset()), {}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        obs, reward, _, _ = self.rm_env.step(np.asarray(action, np.float64))
        self._t += 1
        success = bool(self.rm_env.is_success()["task"])
        return self._obs(obs), float(reward), success, self._t >= self.max_episode_steps, {"success": success}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self.rm_env.render(mode="rgb_array", height=self.render_size, width=self.render_size, camera_name=self.render_camera)

    def close(self) -> None:
        self.rm_env.env.close()


class RobomimicExpert:
    """Scripted pick (Lift) and pick-and-place (PickPlaceCan) through the OSC_POSE controller: move
    above the object, descend, close, lift; for Can carry over the target bin, lower, release, retreat.
    Positions come from the simulator; actions are clipped position deltas (no rotation)."""

    def __init__(self, env: gym.Env, seed: int | None = None) -> None:
        self.env = env.unwrapped
        name = self.env.env_args["env_name"]
        if name not in ("Lift", "PickPlaceCan"):
            raise ConfigError(f"robomimic env {name!r} has no scripted expert; expected Lift or PickPlaceCan")
        self.place = name == "PickPlaceCan"
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        self.phase, self.t_phase = 0, 0

    def _sim(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        env = self.env.rm_env.env
        eef = np.array(env.sim.data.site_xpos[env.robots[0].eef_site_id["right"]])
        if self.place:
            obj = np.array(env.sim.data.body_xpos[env.obj_body_id["Can"]])
            target = np.array(env.target_bin_placements[env.object_to_id["can"]])
            return eef, obj, target
        return eef, np.array(env.sim.data.body_xpos[env.cube_body_id]), None

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        eef, obj, target = self._sim()
        grip = 1.0 if self.phase in (2, 3, 4, 5) else -1.0  # robosuite: +1 closes the gripper
        if self.phase == 0:  # above the object
            goal = obj + [0, 0, 0.10]
        elif self.phase == 1:  # down to grasp height
            goal = obj + [0, 0, -0.005]
        elif self.phase == 2:  # close
            goal = eef
        elif self.phase == 3:  # lift
            goal = np.array([eef[0], eef[1], 1.05]) if self.place else eef + [0, 0, 0.1]
        elif self.phase == 4:  # over the bin
            goal = np.array([target[0], target[1], 1.05])
        elif self.phase == 5:  # lower into the bin
            goal = np.array([target[0], target[1], 0.95])
        elif self.phase == 6:  # release
            goal = eef
        else:  # retreat upwards (success needs the gripper away from the can)
            goal = np.array([target[0], target[1], 1.10])
        err = goal - eef
        self.t_phase += 1
        done = {0: np.linalg.norm(err) < 0.015, 1: np.linalg.norm(err) < 0.01 or self.t_phase > 40, 2: self.t_phase > 8,
                3: np.linalg.norm(err) < 0.02, 4: np.linalg.norm(err[:2]) < 0.015, 5: np.linalg.norm(err) < 0.02,
                6: self.t_phase > 6}.get(self.phase, False)
        if done and not (self.phase == 3 and not self.place):
            self.phase, self.t_phase = self.phase + 1, 0
        action = np.zeros(7, np.float32)
        action[:3] = np.clip(err * 10.0, -1.0, 1.0)
        action[6] = grip
        return action
