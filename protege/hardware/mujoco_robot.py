"""MuJoCo Franka backend: the Kitchen Panda on a table with a cube and a goal marker (`panda.py`).

Time: with `realtime=True` simulated time tracks the monotonic wall clock: every `read()` first
steps the physics until sim time catches up with wall time since `connect()` (the command in force
is held meanwhile, as on a position-controlled arm). There is no physics thread: a 500 Hz Python
loop would share the GIL with the runner and the inference thread and add jitter to both. With
`realtime=False` (as fast as possible) `clock` is a simulated clock whose `sleep_until(t)` steps the
physics to t at once; the gymnasium tasks and the runner's fast mode use that. (`simulated.py`: the
same clock code serves `aloha_robot.py`.)

Actuation: `position` uses the model's joint position servos (kp 870/120 with joint damping);
`impedance` switches them off and applies joint-space PD torques `K (q_d - q) - D qdot` each physics
step (gravity is compensated by the model, as on the real arm).

Cameras (`cameras`: names of the scene's cameras, `front` / `wrist`, or a `cameras:` mapping as for
any robot, see `cameras.py`): MuJoCo-rendered cameras. In real time each renders in its own thread
from snapshots of the simulation (`snapshot`), which advance the physics to the wall clock first, as
a real camera keeps capturing while the loop computes; in simulated time they render synchronously.
A lock serialises physics, commands and snapshots between the loop and the camera threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from protege.errors import ConfigError
from protege.hardware.cameras import CameraSet, close_renderer
from protege.hardware.base import Feature, JointCommand, Limits, Observation, RobotError, single_arm_features
from protege.hardware.panda import ARM_JOINTS, FINGER_JOINTS, HOME_Q, EE_SITE, GRIPPER_MAX, PandaKinematics, load_model
from protege.hardware.simulated import SimulatedTime

IMPEDANCE_K = np.array([600.0, 600.0, 600.0, 600.0, 250.0, 150.0, 50.0])
IMPEDANCE_D = np.array([20.0, 20.0, 20.0, 20.0, 5.0, 3.0, 1.0])  # the joints also have passive damping


class MujocoRobot(SimulatedTime):
    def __init__(
        self,
        name: str = "mujoco",
        realtime: bool = True,
        control: str = "position",
        cameras: tuple[str, ...] | list[str] | Mapping[str, Any] = (),
        image_size: int | tuple[int, int] | list[int] = 96,
        timestep: float = 0.002,
        limits: dict[str, Any] | None = None,
        render_max_faces: int | None = 1000,
    ) -> None:
        """`render_max_faces`: cameras render a copy of the scene whose visual meshes are decimated to
        that many triangles each (physics and `render()` keep the shipped meshes); None: the originals."""
        if control not in ("position", "impedance"):
            raise ConfigError(f"mujoco robot: control must be 'position' or 'impedance', got {control!r}")
        self.name, self.realtime, self.control = name, realtime, control
        self.image_size, self.timestep = _hw(image_size), float(timestep)
        specs = _camera_specs(cameras, self.image_size)
        self.camera_set = CameraSet(specs)
        scene_cams = tuple(sorted({c.get("camera") or n for n, c in specs.items() if c.get("backend") == "mujoco"}))
        self.cameras = tuple(specs)
        # the offscreen buffer must hold the largest rendered image (and the env's render())
        offscreen = max([max(self.image_size)] + [max(int(c.get("height", 0)), int(c.get("width", 0))) for c in specs.values()])
        self.model = load_model(scene_cams, offscreen, self.timestep)
        self.render_model = load_model(scene_cams, offscreen, self.timestep, render_max_faces) if render_max_faces else self.model
        self.kinematics = PandaKinematics(load_model())  # its own model copy: IK never touches the sim state
        self.limits = Limits.panda(self.kinematics.lower, self.kinematics.upper, **(limits or {}))
        self.features = single_arm_features(7, cartesian=True, extra={"cube_pos": Feature((3,), "m (simulator only)"),
                                                                       "goal_pos": Feature((3,), "m (simulator only)")})
        self.stopped = False
        self._init_time()  # clock, data, physics step count, lock (simulated.py)
        self._renderer: Any = None
        m = self.model
        self.qadr = np.array([m.joint(j).qposadr[0] for j in ARM_JOINTS])
        self.dofadr = np.array([m.joint(j).dofadr[0] for j in ARM_JOINTS])
        self.finger_qadr = np.array([m.joint(j).qposadr[0] for j in FINGER_JOINTS])
        self.site = m.site(EE_SITE).id
        self.cube_qadr = m.joint("cube").qposadr[0]
        self.cube_dofadr = m.joint("cube").dofadr[0]
        self.goal_mocap = m.body("goal").mocapid[0]
        if control == "impedance":
            m.actuator_gainprm[:7, 0] = 0.0  # arm servos off; torques come from advance_to
            m.actuator_biasprm[:7, :3] = 0.0

    # -------------------------------------------------------------------------------- protocol
    def connect(self) -> None:
        import mujoco

        self.camera_set.stop()  # a reconnect restarts the cameras on the new simulation
        self.data = mujoco.MjData(self.model)
        self.reset_scene(HOME_Q)
        self.stopped = False
        self.camera_set.attach(self.clock.now, self)
        self.camera_set.start()

    def reset_scene(self, q: np.ndarray = HOME_Q, cube_pos: np.ndarray | None = None,
                    goal_pos: np.ndarray | None = None, gripper: float = GRIPPER_MAX) -> None:
        """Put the arm at `q` at rest, the cube and goal where given; restart sim time (and its wall anchor)."""
        import mujoco

        d = self._require()
        with self._lock:
            self._reset_scene(d, q, cube_pos, goal_pos, gripper)

    def _reset_scene(self, d: Any, q: np.ndarray, cube_pos: np.ndarray | None, goal_pos: np.ndarray | None,
                     gripper: float) -> None:
        import mujoco

        mujoco.mj_resetData(self.model, d)
        d.qpos[self.qadr] = q
        d.qpos[self.finger_qadr] = gripper / 2
        if cube_pos is not None:
            d.qpos[self.cube_qadr : self.cube_qadr + 3] = cube_pos
            d.qpos[self.cube_qadr + 3 : self.cube_qadr + 7] = [1, 0, 0, 0]
        if goal_pos is not None:
            d.mocap_pos[self.goal_mocap] = goal_pos
        self._cmd = JointCommand(q=np.asarray(q, float).copy(), gripper=np.array([gripper], float))
        self._apply(self._cmd)
        self._scene_ready(d)

    def read(self) -> Observation:
        import mujoco

        with self._synced() as d:
            quat = np.empty(4)
            mujoco.mju_mat2Quat(quat, d.site_xmat[self.site])
            cube = d.qpos[self.cube_qadr : self.cube_qadr + 3].copy()
            obs = self._observation(d, quat, cube)
        obs.images, obs.image_t = self.camera_set.read()  # outside the lock: a synchronous camera renders here
        return obs

    def _observation(self, d: Any, quat: np.ndarray, cube: np.ndarray) -> Observation:
        return Observation(
            t=self.sim_time,
            joint_pos=d.qpos[self.qadr].copy(),
            joint_vel=d.qvel[self.dofadr].copy(),
            ee_pos=d.site_xpos[self.site].copy(),
            ee_quat=quat,
            gripper=np.array([d.qpos[self.finger_qadr].sum()]),
            extra={"cube_pos": cube, "goal_pos": d.mocap_pos[self.goal_mocap].copy()},
            features=self.features,
        )

    def command(self, cmd: JointCommand) -> None:
        self._require()
        if self.stopped:
            raise RobotError(f"{self.name}: command after stop(); reconnect first")
        with self._lock:
            self._cmd = JointCommand(q=np.asarray(cmd.q, float).copy(), gripper=np.asarray(cmd.gripper, float).reshape(1).copy())
            self._apply(self._cmd)

    def stop(self) -> None:
        """Hold the current measured position and refuse further commands until `connect()`."""
        if self.data is None:
            return
        with self._lock:
            self._cmd = JointCommand(q=self.data.qpos[self.qadr].copy(), gripper=np.array([self.data.qpos[self.finger_qadr].sum()]))
            self._apply(self._cmd)
        self.stopped = True
        self.camera_set.stop()  # the run is over; connect() starts them again

    def close(self) -> None:
        self.camera_set.stop()
        if self._renderer is not None:
            close_renderer(self._renderer)
            self._renderer = None

    # ------------------------------------------------------------------------------- simulation
    def _physics_steps(self, d: Any, n: int) -> None:
        """`n` physics steps (`advance_to`, simulated.py); impedance control sets its PD torques each step."""
        import mujoco

        if self.control != "impedance":
            super()._physics_steps(d, n)
            return
        for _ in range(n):
            q, qd = d.qpos[self.qadr], d.qvel[self.dofadr]
            d.qfrc_applied[self.dofadr] = IMPEDANCE_K * (self._cmd.q - q) - IMPEDANCE_D * qd
            mujoco.mj_step(self.model, d)

    def render(self, camera: str) -> np.ndarray:
        """One frame of a scene camera at `image_size`, on the calling thread (the env's render())."""
        import mujoco

        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, *self.image_size)
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX):
                self._renderer.scene.flags[flag] = 0
        self._renderer.update_scene(self.data, camera=camera)
        return self._renderer.render().copy()

    def _apply(self, cmd: JointCommand) -> None:
        self.data.ctrl[:7] = cmd.q
        self.data.ctrl[7:9] = cmd.gripper[0] / 2


def _hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image size: one int (square) or (height, width)."""
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ConfigError(f"mujoco robot: image_size must be an int or [height, width], got {size!r}")
    return int(size[0]), int(size[1])


def _camera_specs(cameras: tuple[str, ...] | list[str] | Mapping[str, Any], size: tuple[int, int]) -> dict[str, dict]:
    """Scene camera names -> MuJoCo-rendered cameras at `size`; a mapping is used as given (any backend)."""
    if isinstance(cameras, Mapping):
        specs = {n: dict(c) for n, c in cameras.items()}
        for c in specs.values():
            if c.get("backend") == "mujoco":
                c.setdefault("height", size[0])
                c.setdefault("width", size[1])
        return specs
    return {n: {"backend": "mujoco", "height": size[0], "width": size[1]} for n in cameras}
