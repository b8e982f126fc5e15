"""Bimanual ALOHA in MuJoCo (two ViperX 300 s arms, ACT's scene from `gym-aloha`) as a `Robot`.

It declares two arms (`left_arm`, `right_arm`: 6 joints each, rad) with one gripper each (normalised
0 closed .. 1 open, ACT's convention), so the joint-position action is ACT's 14-D
[left 6, left gripper, right 6, right gripper] and the runner, safety layer and recording handle it
without knowing it is bimanual. The physics are `AlohaEnv`'s (`protege/envs/aloha.py`): same model,
same 2 ms timestep, joint-position actuators, mirrored finger slides, so a policy sees the same robot
in `protege eval` and `protege run hardware=aloha_mujoco`.

Time: simulated (`realtime: false`, the default: the clock's `sleep_until` steps the physics, so runs
are reproducible and match evaluation) or real time (physics catch up with the wall clock at every
`read()`; the clock code is `simulated.py`, shared with `mujoco_robot.py`). Limits: joint positions
are the actuators' control ranges (MuJoCo clamps to them too), grippers the normalised [0, 1]; velocity and acceleration limits default to values that
do not bind in simulation, whose position servos bound the motion themselves (ACT's scripted motions
reach 13 rad/s target steps); a real arm declares its servos' limits in `limits`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from protege.errors import ConfigError
from protege.hardware.base import ArmGroup, Feature, JointCommand, Limits, Observation, RobotError, RobotFeatures
from protege.hardware.cameras import CameraSet
from protege.hardware.mujoco_robot import _camera_specs, _hw
from protege.hardware.simulated import SimulatedTime

N_ARM = 6
ARM_QPOS = np.r_[0:6, 8:14]  # qpos of the 12 arm joints (fingers at 6-7 and 14-15; objects from 16)
FINGER_QPOS = np.array([6, 14])  # one finger slide per gripper (the other mirrors it)
FEATURES = RobotFeatures(
    state={"joint_pos": Feature((12,), "rad"), "joint_vel": Feature((12,), "rad/s"),
           "gripper": Feature((2,), "normalised (0 closed, 1 open)"),
           "gripper_vel": Feature((2,), "normalised/s"),
           "env_state": Feature((7,), "object pose: m + quaternion (simulator only)")},
    arms=(ArmGroup("left_arm", tuple(range(0, 6)), 0), ArmGroup("right_arm", tuple(range(6, 12)), 1)),
    cartesian=False)


class AlohaRobot(SimulatedTime):
    def __init__(
        self,
        name: str = "aloha_mujoco",
        scene: str = "transfer_cube",
        realtime: bool = False,
        cameras: tuple[str, ...] | list[str] | Mapping[str, Any] = (),
        image_size: int | tuple[int, int] | list[int] = (96, 128),
        limits: dict[str, Any] | None = None,
    ) -> None:
        from protege.hardware.aloha_model import TASKS, load_model

        if scene not in TASKS:
            raise ConfigError(f"aloha robot: scene must be one of {TASKS}, got {scene!r}")
        self.name, self.scene, self.realtime = name, scene, realtime
        self.model = load_model(scene)
        # cameras draw the scene with decimated meshes, as AlohaEnv's cameras do (same images)
        self.render_model = load_model(scene, max_faces=400) if cameras else self.model
        self.timestep = float(self.model.opt.timestep)
        self.image_size = _hw(image_size)
        self.camera_set = CameraSet(_camera_specs(cameras, self.image_size))
        self.cameras = self.camera_set.names()
        self.features = FEATURES
        n_obj = 7 if scene == "transfer_cube" else 14
        if n_obj != 7:
            self.features = RobotFeatures({**FEATURES.state, "env_state": Feature((n_obj,), FEATURES.state["env_state"].unit)},
                                          FEATURES.arms, False)
        self.limits = self._limits(limits or {})
        self.kinematics = None  # joint space only: no IK, no workspace box
        self.stopped = False
        self._init_time()  # clock, data, physics step count, lock (simulated.py)

    def _limits(self, overrides: dict[str, Any]) -> Limits:
        arm = self.model.actuator_ctrlrange[np.r_[0:6, 8:14]]
        # grippers: the normalised range; MuJoCo clamps the finger slides to their control range after
        kw: dict[str, Any] = dict(joint_lower=arm[:, 0].copy(), joint_upper=arm[:, 1].copy(),
                                  joint_vel=np.full(12, 50.0), joint_acc=np.full(12, 1e5),
                                  workspace_lower=None, workspace_upper=None, gripper_min=0.0, gripper_max=1.0,
                                  max_joint_step=np.inf)
        for k, v in overrides.items():
            if k not in kw and k != "max_ee_step":
                raise ConfigError(f"aloha robot: unknown limit {k!r}; expected some of {sorted(kw)}")
            kw[k] = np.asarray(v, float) if isinstance(v, (list, tuple)) else v
        return Limits(**kw)

    # -------------------------------------------------------------------------------- protocol
    def connect(self) -> None:
        import mujoco

        self.camera_set.stop()
        self.data = mujoco.MjData(self.model)
        self.reset_scene()
        self.stopped = False
        self.camera_set.attach(self.clock.now, self)
        self.camera_set.start()

    def reset_scene(self, objects: np.ndarray | None = None) -> None:
        """ACT's start pose, the objects at `objects` (7 per object: position + quaternion); restarts time."""
        import mujoco

        from protege.hardware.aloha_model import START_ARM_POSE

        d = self._require()
        with self._lock:
            mujoco.mj_resetData(self.model, d)
            d.qpos[:16] = START_ARM_POSE
            if objects is not None:
                d.qpos[16:] = objects
            d.ctrl[:] = START_ARM_POSE
            self._scene_ready(d)

    def read(self) -> Observation:
        from protege.hardware.aloha_model import GRIPPER_CLOSE, GRIPPER_OPEN, normalize_gripper

        with self._synced() as d:
            q, v = d.qpos, d.qvel
            obs = Observation(t=self.sim_time, joint_pos=q[ARM_QPOS].copy(), joint_vel=v[ARM_QPOS].copy(), ee_pos=None,
                              ee_quat=None, gripper=np.asarray(normalize_gripper(q[FINGER_QPOS]), float),
                              extra={"env_state": q[16:].copy(),
                                     "gripper_vel": v[FINGER_QPOS] / (GRIPPER_OPEN - GRIPPER_CLOSE)},
                              features=self.features)
        obs.images, obs.image_t = self.camera_set.read()
        return obs

    def command(self, cmd: JointCommand) -> None:
        from protege.hardware.aloha_model import unnormalize_gripper

        d = self._require()
        if self.stopped:
            raise RobotError(f"{self.name}: command after stop(); reconnect first")
        q, g = np.asarray(cmd.q, float), unnormalize_gripper(np.asarray(cmd.gripper, float))
        with self._lock:  # actuators: per arm 6 joints + 2 mirrored finger slides (as AlohaEnv.step)
            d.ctrl[:] = np.concatenate([q[:6], [g[0], -g[0]], q[6:], [g[1], -g[1]]])

    def stop(self) -> None:
        """Hold the measured position and refuse further commands until `connect()`."""
        if self.data is None:
            return
        with self._lock:
            d = self.data
            d.ctrl[:] = np.concatenate([d.qpos[0:6], [d.qpos[6], -d.qpos[6]], d.qpos[8:14], [d.qpos[14], -d.qpos[14]]])
        self.stopped = True
        self.camera_set.stop()

    def close(self) -> None:
        self.camera_set.stop()
