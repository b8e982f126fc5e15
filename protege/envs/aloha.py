"""Bimanual ALOHA-style tasks (two ViperX 300s arms on a table, MuJoCo), after ACT's simulated tasks.

Tasks: `transfer_cube` (the right arm picks up a cube at a random pose and hands it to the left arm;
success = the cube touches a left-arm finger and not the table) and `insertion` (the arms pick up a
peg and a socket at random poses and insert the peg; success = the peg touches the pin inside the
socket). Success is sticky within an episode (ACT counts an episode as solved when its maximum reward
reaches the top stage at any step); `info["stage"]` is ACT's reward stage now (0-4, also the reward) and
`info["max_stage"]` its maximum so far.

The scene (meshes, arms, cameras) is the MJCF shipped by the `gym-aloha` package (Apache-2.0, from
ACT), loaded with plain `mujoco`; environment, success check and experts are ours (no dm_control).

Control: 50 Hz (10 physics steps of 2 ms per `step`), joint-position actuators.
- action (14,): per arm [6 joint position targets (rad), gripper target (normalised 0 closed .. 1 open)],
  left arm first (ACT's convention).
- observation: `state` (14,) float32 = per arm 6 joint positions + normalised gripper finger position,
  `qvel` (14,) the matching velocities (gripper normalised the same way), `env_state` (7 per object:
  position + quaternion; 7 for the cube, 14 for peg then socket), and with `cameras` one
  `{<camera>: HxWx3 uint8}` per camera. Cameras: `top`, `angle`, `left_wrist`, `right_wrist`,
  `left_pillar`, `right_pillar`, `front_close`.

Rendering (cameras, `render()`): `image_size=(H, W)`, default 96x128 (ACT uses 480x640, far too slow
for software GL on a CPU). Frames are drawn from a copy of the scene whose meshes are decimated to
`render_max_faces` triangles each (default 400; None draws the original ~30k-triangle arms, ~3x
slower), posed from the simulation at every step; physics always uses the original meshes. No
shadows, reflections, skybox or multisampling. State-only envs (no cameras, no render_mode) never
create a GL context.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from protege.errors import ConfigError
from protege.hardware.aloha_model import (CAMERAS, FPS, GRIPPER_CLOSE, GRIPPER_OPEN, N_SUBSTEPS,  # noqa: F401 - re-exported
                                          START_ARM_POSE, TASKS, assets_dir, load_model, normalize_gripper,
                                          unnormalize_gripper)
from protege.hardware.cameras import close_renderer


def sample_object_poses(task: str, rng: np.random.Generator) -> np.ndarray:
    """ACT's pose ranges (utils.sample_box_pose / sample_insertion_pose): positions, upright quaternions."""
    def pose(x: tuple[float, float], y: tuple[float, float]) -> np.ndarray:
        return np.array([rng.uniform(*x), rng.uniform(*y), 0.05, 1.0, 0.0, 0.0, 0.0])

    if task == "transfer_cube":
        return pose((0.0, 0.2), (0.4, 0.6))
    return np.concatenate([pose((0.1, 0.2), (0.4, 0.6)), pose((-0.2, -0.1), (0.4, 0.6))])


class _Contacts:
    """ACT's reward stages from geom contacts (checked as unordered pairs)."""

    def __init__(self, model: Any, task: str) -> None:
        import mujoco

        def gid(name: str) -> int:
            return mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, name)

        fingers = {side: {gid(f"vx300s_{side}/10_{f}_gripper_finger") for f in ("left", "right")} for side in ("left", "right")}
        self.task, self.left, self.right, self.table = task, fingers["left"], fingers["right"], gid("table")
        if task == "transfer_cube":
            self.obj = {gid("red_box")}
        else:
            self.peg, self.pin = gid("red_peg"), gid("pin")
            self.socket = {gid(f"socket-{i}") for i in range(1, 5)}

    def stage(self, data: Any) -> int:
        n = data.ncon
        pairs = {frozenset(p) for p in zip(data.contact.geom1[:n].tolist(), data.contact.geom2[:n].tolist())}

        def touch(a: set[int] | int, b: set[int] | int) -> bool:
            a, b = ({a} if isinstance(a, int) else a), ({b} if isinstance(b, int) else b)
            return any(frozenset((i, j)) in pairs for i in a for j in b)

        if self.task == "transfer_cube":
            on_table = touch(self.obj, self.table)
            if touch(self.obj, self.left):
                return 3 if on_table else 4  # 4: handed over and lifted
            if touch(self.obj, self.right):
                return 1 if on_table else 2
            return 0
        if touch(self.peg, self.pin):
            return 4  # peg inside the socket, touching its pin
        peg_table, socket_table = touch(self.peg, self.table), touch(self.socket, self.table)
        if touch(self.peg, self.socket) and not peg_table and not socket_table:
            return 3
        both = touch(self.peg, self.right) and touch(self.socket, self.left)
        if both:
            return 1 if peg_table or socket_table else 2
        return 0


class AlohaEnv(gym.Env):
    """One bimanual task; `reset(seed=...)` draws the object poses from the env's seeded generator."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}

    def __init__(
        self,
        task: str = "transfer_cube",
        max_episode_steps: int = 400,
        cameras: tuple[str, ...] | list[str] = (),
        image_size: tuple[int, int] | list[int] = (96, 128),
        render_mode: str | None = None,
        render_camera: str = "angle",
        terminate_on_success: bool = False,
        render_max_faces: int | None = 400,
    ) -> None:
        import mujoco

        if task not in TASKS:
            raise ConfigError(f"unknown ALOHA task {task!r}; expected one of {TASKS}")
        unknown = [c for c in (*cameras, render_camera) if c not in CAMERAS]
        if unknown:
            raise ConfigError(f"unknown ALOHA camera(s) {unknown}; expected some of {CAMERAS}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ConfigError(f"image_size: expected (height, width), got {image_size!r}")
        self.task = task
        self.max_episode_steps = int(max_episode_steps)
        self.cameras = tuple(cameras)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.render_mode = render_mode
        self.render_camera = render_camera
        self.terminate_on_success = terminate_on_success
        self.render_max_faces = render_max_faces
        self.model = load_model(task)
        self.data = mujoco.MjData(self.model)
        self._contacts = _Contacts(self.model, task)
        self._renderer: Any = None  # created on first use: state-only runs never touch GL
        self._vis: tuple[Any, Any] | None = None  # (model, data) of the decimated scene the renderer draws
        self._vis_synced: tuple[int, int] | None = None
        n_obj = 7 if task == "transfer_cube" else 14
        h, w = self.image_size
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (14,), np.float32),
                  "qvel": gym.spaces.Box(-np.inf, np.inf, (14,), np.float32),
                  "env_state": gym.spaces.Box(-np.inf, np.inf, (n_obj,), np.float32)}
        spaces.update({c: gym.spaces.Box(0, 255, (h, w, 3), np.uint8) for c in self.cameras})
        self.observation_space = gym.spaces.Dict(spaces)
        arm = self.model.actuator_ctrlrange[:6]
        low = np.concatenate([arm[:, 0], [0.0]] * 2).astype(np.float32)
        high = np.concatenate([arm[:, 1], [1.0]] * 2).astype(np.float32)
        self.action_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.t = 0
        self.episode = 0  # counts resets, so an expert knows when to plan a new episode
        self.initial_object_poses = np.zeros(n_obj)
        self.max_stage = 0

    # -- simulation ------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        import mujoco

        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        self.initial_object_poses = sample_object_poses(self.task, self.np_random)
        self.data.qpos[:16] = START_ARM_POSE
        self.data.qpos[16:] = self.initial_object_poses
        self.data.ctrl[:] = START_ARM_POSE
        mujoco.mj_forward(self.model, self.data)
        self.t, self.max_stage = 0, 0
        self.episode += 1
        return self._obs(), {"success": False, "stage": 0, "max_stage": 0}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        import mujoco

        a = np.asarray(action, dtype=np.float64)
        if a.shape != (14,):
            raise ValueError(f"ALOHA action: expected shape (14,), got {a.shape}")
        left, right = unnormalize_gripper(a[6]), unnormalize_gripper(a[13])
        # actuators: 6 arm joints + 2 mirrored finger slides per arm (MuJoCo clamps to ctrlrange)
        self.data.ctrl[:] = np.concatenate([a[:6], [left, -left], a[7:13], [right, -right]])
        mujoco.mj_step(self.model, self.data, nstep=N_SUBSTEPS)
        self.t += 1
        stage = self._contacts.stage(self.data)
        self.max_stage = max(self.max_stage, stage)
        success = self.max_stage == 4
        info = {"success": success, "stage": stage, "max_stage": self.max_stage}
        terminated = success and self.terminate_on_success
        return self._obs(), float(stage), terminated, self.t >= self.max_episode_steps, info

    def _obs(self) -> dict[str, np.ndarray]:
        q, v = self.data.qpos, self.data.qvel
        state = np.concatenate([q[:6], [normalize_gripper(q[6])], q[8:14], [normalize_gripper(q[14])]])
        span = GRIPPER_OPEN - GRIPPER_CLOSE
        qvel = np.concatenate([v[:6], [v[6] / span], v[8:14], [v[14] / span]])
        obs = {"state": state.astype(np.float32), "qvel": qvel.astype(np.float32),
               "env_state": q[16:].astype(np.float32)}
        for cam in self.cameras:
            obs[cam] = self._render(cam)
        return obs

    # -- rendering -------------------------------------------------------------------------------
    def _render(self, camera: str) -> np.ndarray:
        import mujoco

        if self._renderer is None:
            if self.render_max_faces:  # same bodies and cameras, lighter meshes: physics stays ACT's
                vis = load_model(self.task, max_faces=self.render_max_faces)
                self._vis = (vis, mujoco.MjData(vis))
            else:
                self._vis = (self.model, self.data)
            self._renderer = _make_renderer(self._vis[0], *self.image_size)
        m, d = self._vis
        if d is not self.data and self._vis_synced != (self.episode, self.t):
            d.qpos[:] = self.data.qpos  # poses only: kinematics and cameras, no dynamics
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            mujoco.mj_camlight(m, d)
            self._vis_synced = (self.episode, self.t)
        self._renderer.update_scene(d, camera=camera)
        return self._renderer.render()

    def render(self) -> np.ndarray | None:
        return self._render(self.render_camera) if self.render_mode == "rgb_array" else None

    def close(self) -> None:
        if self._renderer is not None:
            close_renderer(self._renderer)
            self._renderer = None


def _make_renderer(model: Any, height: int, width: int) -> Any:
    """An offscreen renderer without shadows, reflections or skybox (they cost most of the
    software-GL time at small image sizes; see metaworld._cheap_visuals)."""
    import mujoco

    model.vis.global_.offheight = max(model.vis.global_.offheight, height)
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
    renderer = mujoco.Renderer(model, height, width)
    for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX):
        renderer.scene.flags[flag] = 0
    return renderer


# -- scripted experts --------------------------------------------------------------------------------
def _quat(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    import mujoco

    q = np.zeros(4)
    mujoco.mju_axisAngle2Quat(q, np.asarray(axis, float), np.deg2rad(degrees))
    return q


def _mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import mujoco

    q = np.zeros(4)
    mujoco.mju_mulQuat(q, a, b)
    return q


def waypoints(task: str, objects: np.ndarray, init_left: np.ndarray, init_right: np.ndarray) -> tuple[list, list]:
    """ACT's scripted end-effector waypoints (scripted_policy.py): per arm a list of
    (t, xyz, quat, gripper) for the gripper_link's mocap target; `init_*` are its start poses (7,)."""
    up = np.array([1.0, 0.0, 0.0, 0.0])
    if task == "transfer_cube":
        box = objects[:3]
        pick = _mul(init_right[3:], _quat((0, 1, 0), -60))
        meet_left = _quat((1, 0, 0), 90)
        meet = np.array([0, 0.5, 0.25])
        left = [(0, init_left[:3], init_left[3:], 0),  # sleep
                (100, meet + [-0.1, 0, -0.02], meet_left, 1),  # approach the meet position
                (260, meet + [0.02, 0, -0.02], meet_left, 1),  # move to the meet position
                (310, meet + [0.02, 0, -0.02], meet_left, 0),  # close the gripper
                (360, meet + [-0.1, 0, -0.02], up, 0),  # move left
                (400, meet + [-0.1, 0, -0.02], up, 0)]  # stay
        right = [(0, init_right[:3], init_right[3:], 0),  # sleep
                 (90, box + [0, 0, 0.08], pick, 1),  # approach the cube
                 (130, box + [0, 0, -0.015], pick, 1),  # go down
                 (170, box + [0, 0, -0.015], pick, 0),  # close the gripper
                 (200, meet + [0.05, 0, 0], pick, 0),  # approach the meet position
                 (220, meet, pick, 0),  # move to the meet position
                 (310, meet, pick, 1),  # open the gripper
                 (360, meet + [0.1, 0, 0], pick, 1),  # move right
                 (400, meet + [0.1, 0, 0], pick, 1)]  # stay
        return left, right
    peg, socket = objects[:3], objects[7:10]
    pick_right = _mul(init_right[3:], _quat((0, 1, 0), -60))
    pick_left = _mul(init_right[3:], _quat((0, 1, 0), 60))  # (sic: ACT derives both from the right pose)
    meet = np.array([0, 0.5, 0.15])
    lift_right = 0.00715
    left = [(0, init_left[:3], init_left[3:], 0),  # sleep
            (120, socket + [0, 0, 0.08], pick_left, 1),  # approach the socket
            (170, socket + [0, 0, -0.03], pick_left, 1),  # go down
            (220, socket + [0, 0, -0.03], pick_left, 0),  # close the gripper
            (285, meet + [-0.1, 0, 0], pick_left, 0),  # approach the meet position
            (340, meet + [-0.05, 0, 0], pick_left, 0),  # insertion
            (400, meet + [-0.05, 0, 0], pick_left, 0)]
    right = [(0, init_right[:3], init_right[3:], 0),  # sleep
             (120, peg + [0, 0, 0.08], pick_right, 1),  # approach the peg
             (170, peg + [0, 0, -0.03], pick_right, 1),  # go down
             (220, peg + [0, 0, -0.03], pick_right, 0),  # close the gripper
             (285, meet + [0.1, 0, lift_right], pick_right, 0),  # approach the meet position
             (340, meet + [0.05, 0, lift_right], pick_right, 0),  # insertion
             (400, meet + [0.05, 0, lift_right], pick_right, 0)]
    return left, right


def _interpolate(path: list, t: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Linear interpolation between the waypoints around step t (quaternions too, as ACT does;
    MuJoCo normalises mocap quaternions)."""
    for (t0, x0, q0, g0), (t1, x1, q1, g1) in zip(path, path[1:]):
        if t0 <= t < t1 or (t1 == path[-1][0] and t >= t1):
            f = min(1.0, (t - t0) / (t1 - t0))
            return np.asarray(x0) + f * (np.asarray(x1) - x0), np.asarray(q0) + f * (np.asarray(q1) - q0), g0 + f * (g1 - g0)
    raise AssertionError("unreachable: waypoint paths start at t=0")


class _EndEffectorSim:
    """ACT's ee_sim_env without dm_control: the grippers follow mocap bodies through weld constraints;
    the arm joint positions it produces are the expert's joint-position targets."""

    ALIGN_FROM, ALIGN_GAIN = 250, 0.05

    def __init__(self, task: str) -> None:
        import mujoco

        self.task = task
        self.model = load_model(task, end_effector=True)
        # Under MuJoCo 3.x the arms (joint friction 30-60) lag ACT's soft welds (solimp .25) by ~2.5 cm,
        # so the fingers only brush the top of the cube; stiffer welds track the waypoints as in ACT.
        self.model.eq_solimp[:] = [0.9, 0.95, 0.001, 0.5, 2]
        self.data = mujoco.MjData(self.model)
        self._grip = [mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, f"vx300s_{s}/gripper_link") for s in ("left", "right")]

    def joint_trajectory(self, objects: np.ndarray, n_steps: int, noise: float = 0.0,
                         rng: np.random.Generator | None = None) -> np.ndarray:
        """(n_steps, 14) actions: arm joint positions reached after each step + the gripper command."""
        import mujoco

        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        d.qpos[:16] = START_ARM_POSE
        d.qpos[16:] = objects
        mujoco.mj_forward(m, d)
        # mocap starts at the grippers' positions with ACT's level orientation (the welds' relative
        # pose comes from qpos0, so the grippers settle ~13 cm behind their targets: ACT's geometry)
        init = [np.concatenate([d.xpos[b], [1.0, 0.0, 0.0, 0.0]]) for b in self._grip]
        for i in range(2):
            d.mocap_pos[i], d.mocap_quat[i] = init[i][:3], init[i][3:]
        d.ctrl[:] = [GRIPPER_CLOSE, -GRIPPER_CLOSE] * 2
        mujoco.mj_forward(m, d)
        paths = waypoints(self.task, objects, *init)
        out = np.zeros((n_steps, 14))
        align = np.zeros(3)
        for t in range(n_steps):
            if self.task == "insertion" and t >= self.ALIGN_FROM:
                # steer the peg's height and depth onto the socket's axis, from where the objects sit in
                # the grippers of this simulation (ACT's fixed `lift_right` leaves ~10 % of pegs jammed)
                err = d.qpos[23:26] - d.qpos[16:19]
                align[1:] = np.clip(align[1:] + self.ALIGN_GAIN * err[1:], -0.02, 0.02)
            grips = []
            for i, path in enumerate(paths):
                xyz, quat, grip = _interpolate(path, t)
                if i == 1:
                    xyz = xyz + align
                if noise and rng is not None:  # ACT's inject_noise: uniform jitter of the targets
                    xyz = xyz + rng.uniform(-noise, noise, 3)
                d.mocap_pos[i], d.mocap_quat[i] = xyz, quat
                grips.append(grip)
            g = unnormalize_gripper(np.asarray(grips))
            d.ctrl[:] = [g[0], -g[0], g[1], -g[1]]
            mujoco.mj_step(m, d, nstep=N_SUBSTEPS)
            out[t] = np.concatenate([d.qpos[:6], [grips[0]], d.qpos[8:14], [grips[1]]])
        return out


class AlohaExpert:
    """ACT's scripted policy, as joint-position targets: at the start of each episode it runs the
    end-effector waypoints in a mocap copy of the scene with the episode's object poses, records
    the arm joint positions, and then replays them (open loop) through the env's joint control.
    Deviations from ACT, in the planning copy only: stiffer welds, and (insertion) the peg steered
    onto the socket's axis. Measured: transfer-cube 100/100, insertion 98/100 (seeds 0-99)."""

    def __init__(self, env: gym.Env, seed: int | None = None, noise: float = 0.0) -> None:
        self.env: AlohaEnv = env.unwrapped  # type: ignore[assignment]
        if not isinstance(self.env, AlohaEnv):
            raise ConfigError(f"AlohaExpert needs an AlohaEnv, got {type(self.env).__name__}")
        self.sim = _EndEffectorSim(self.env.task)
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.plan: np.ndarray | None = None
        self._planned_for = -1

    def reset(self) -> None:
        self.plan = None

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        env = self.env
        if self.plan is None or self._planned_for != env.episode:
            self.plan = self.sim.joint_trajectory(env.initial_object_poses, env.max_episode_steps, self.noise, self.rng)
            self._planned_for = env.episode
        return self.plan[min(env.t, len(self.plan) - 1)].astype(np.float32)


class AlohaHardwareTask:
    """An ALOHA task on the HAL robot (`protege/hardware/aloha_robot.py`, `protege run hardware=aloha_mujoco`):
    the same object poses per seed and the same sticky success (ACT's top reward stage) as `AlohaEnv`.
    Success needs the simulator's contacts, so this task only runs on the simulated robot."""

    action_space = "joint_pos"
    # the policy's obs/state is AlohaEnv's [left 6, left gripper, right 6, right gripper]; env_state the objects
    state_keys = {"state": ["left_arm", "left_arm_gripper", "right_arm", "right_arm_gripper"], "env_state": ["env_state"]}

    def __init__(self, task: str, max_episode_steps: int = 400) -> None:
        if task not in TASKS:
            raise ConfigError(f"unknown ALOHA task {task!r}; expected one of {TASKS}")
        self.name, self.max_episode_steps = task, int(max_episode_steps)
        self.robot_options = {"scene": task}  # the robot must load this task's scene (its objects)
        self.robot: Any = None
        self.max_stage = 0

    def reset(self, robot: Any, rng: np.random.Generator) -> None:
        if getattr(robot, "scene", None) != self.name:
            raise ConfigError(f"ALOHA task {self.name!r} needs the aloha_mujoco robot with scene={self.name!r}, "
                              f"got {getattr(robot, 'name', robot)!r}")
        robot.reset_scene(sample_object_poses(self.name, rng))
        self.robot, self._contacts, self.max_stage = robot, _Contacts(robot.model, self.name), 0

    def success(self, obs: Any) -> bool:
        self.max_stage = max(self.max_stage, self._contacts.stage(self.robot.data))
        return self.max_stage == 4

    def episode_info(self) -> dict[str, int]:
        return {"max_stage": int(self.max_stage)}
