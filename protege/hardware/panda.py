"""The Franka Panda model, its table scene, and inverse kinematics: shared by the MuJoCo backend, the
Franka sim tasks and the real-Franka backend (which uses it for kinematics only), so all three
convert poses to joints the same way.

Model: the Panda MJCF with meshes that `gymnasium-robotics` ships for Franka Kitchen (Apache-2.0),
included as-is, in a scene of ours: a table, a cube, a goal marker (a mocap body, visual only) and
two cameras. Gravity compensation is on for the arm bodies (the real Panda compensates
gravity in firmware), so the position servos track their targets without a steady-state sag.

IK: damped least squares on MuJoCo's own site Jacobian (`mj_jacSite`), position + orientation, with
a null-space pull toward the home posture. We use it rather than `mink` because under Meta-World's
pin (mujoco 3.3.0) pip only resolves mink 0.0.13, and one 7-DoF arm with a single end-effector
task needs ~30 lines of DLS, which runs at ~20 us per iteration without a QP solver.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from protege.errors import ConfigError

N_JOINTS = 7
# Official joint limits, in Franka's joint convention. Sources: Franka's FCI documentation, "Robot and
# interface specifications" (frankaemika.github.io/docs/control_parameters.html: "Limits for Panda",
# "Limits for Franka Research 3"), and the constants libfranka enforces in include/franka/rate_limiting.h
# (kMaxJointJerk / kMaxJointAcceleration / kMaxJointVelocity up to libfranka 0.9 for Panda; from 0.10 on,
# FR3's values plus computeUpper/LowerLimitsJointVelocity, the position-dependent FR3 velocity bounds).
# FR3 allows less acceleration (10 rad/s^2 on every joint) and jerk (5000 rad/s^3) than Panda: a table
# copied from Panda lets joints 6-7 accelerate at 20 rad/s^2, twice what FR3 accepts.
FRANKA_SPECS: dict[str, dict[str, np.ndarray]] = {
    "panda": {
        "lower": np.array([-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973]),
        "upper": np.array([2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973]),
        "velocity": np.array([2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61]),
        "acceleration": np.array([15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0]),
        "jerk": np.array([7500.0, 3750.0, 5000.0, 6250.0, 7500.0, 10000.0, 10000.0]),
    },
    "fr3": {
        "lower": np.array([-2.7437, -1.7837, -2.9007, -3.0421, -2.8065, 0.5445, -3.0159]),
        "upper": np.array([2.7437, 1.7837, 2.9007, -0.1518, 2.8065, 4.5169, 3.0159]),
        "velocity": np.array([2.62, 2.62, 2.62, 2.62, 5.26, 4.18, 5.26]),
        "acceleration": np.full(7, 10.0),
        "jerk": np.full(7, 5000.0),
        # FR3's velocity bound shrinks near the position limits (libfranka computeUpperLimitsJointVelocity):
        # v_max(q) = min(velocity, max(0, -offset + sqrt(gain * (upper_v - q)))), mirrored for v_min(q)
        "v_gain": np.array([12.0, 5.17, 7.0, 8.0, 34.0, 11.0, 34.0]),
        "v_offset": np.array([0.30, 0.20, 0.20, 0.30, 0.35, 0.35, 0.35]),
        "upper_v": np.array([2.7501, 1.7918, 2.9065, -0.1458, 2.8101, 4.5205, 3.0196]),
        "lower_v": np.array([-2.7501, -1.7918, -2.9065, -3.0481, -2.8101, 0.54092, -3.0196]),
    },
}
# the MuJoCo Panda's servos and the safety layer's defaults: Panda's maxima. The Kitchen MJCF offsets
# joint 6 by a body rotation, so its range there is the model's, read at load time.
VEL_LIMITS = FRANKA_SPECS["panda"]["velocity"]
ACC_LIMITS = FRANKA_SPECS["panda"]["acceleration"]
GRIPPER_MAX = 0.08  # fully open width (two fingers x 0.04 m)
TABLE_HEIGHT = 0.0  # the table top is the world z = 0 plane (the robot base sits on it)

ARM_JOINTS = [f"robot:panda0_joint{i}" for i in range(1, 8)]
FINGER_JOINTS = ["robot:panda0_finger_joint1", "robot:panda0_finger_joint2"]
EE_SITE = "end_effector"


def _assets_dir() -> Path:
    import importlib.util

    # find the package without importing it (its import registers every env and prints warnings)
    spec = importlib.util.find_spec("gymnasium_robotics")
    if spec is None or not spec.origin:
        raise ConfigError("the MuJoCo Franka model needs gymnasium-robotics (pip install gymnasium-robotics)")
    d = Path(spec.origin).parent / "envs/assets/kitchen_franka/franka_assets"
    if not (d / "chain.xml").exists():
        raise ConfigError(f"{d}: expected the Franka Kitchen Panda MJCF (chain.xml), not found")
    return d


def scene_xml(cameras: tuple[str, ...] = (), image_size: int = 96, timestep: float = 0.002) -> str:
    """The scene: the Kitchen Panda on a table, a 5 cm cube (free joint), a goal marker, cameras."""
    d = _assets_dir()
    cams = {
        "front": '<camera name="front" pos="1.35 0 0.55" xyaxes="0 1 0 -0.38 0 0.92" fovy="50"/>',
        "wrist": "",  # attached to the hand below
    }
    unknown = [c for c in cameras if c not in cams]
    if unknown:
        raise ConfigError(f"unknown camera {unknown[0]!r}; expected one of {sorted(cams)}")
    wrist = '<camera name="wrist" pos="0.05 0 0.12" euler="0 3.1416 1.5708" fovy="70"/>'
    chain = (d / "chain.xml").read_text()
    # the wrist camera rides on link 7, next to the end-effector site
    chain = chain.replace("<site name='end_effector'", wrist + "\n<site name='end_effector'", 1)
    chain = chain.split("<mujocoinclude>", 1)[1].rsplit("</mujocoinclude>", 1)[0]
    # gravity compensation must be in the XML: MuJoCo counts compensated bodies at compile time
    chain = chain.replace('<body name="panda0_', '<body gravcomp="1" name="panda0_')
    assets = (d / "assets.xml").read_text().split("<mujocoinclude>", 1)[1].rsplit("</mujocoinclude>", 1)[0]
    assets = assets.replace('meshdir="franka_assets/meshes"', f'meshdir="{d / "meshes"}"')
    assets = assets.replace('<option timestep="0.002"/>', f'<option timestep="{timestep}"/>')
    actuators = (d / "actuator.xml").read_text().split("<mujocoinclude>", 1)[1].rsplit("</mujocoinclude>", 1)[0]
    return f"""<mujoco model="protege_panda_table">
  {assets}
  <visual><global offwidth="{image_size}" offheight="{image_size}"/><quality shadowsize="0"/></visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1=".55 .5 .45" rgb2=".5 .45 .4" width="256" height="256"/>
    <material name="table" texture="grid" texrepeat="8 8"/>
  </asset>
  <worldbody>
    <light pos="0.5 0 2" dir="0 0 -1" diffuse=".9 .9 .9"/>
    <geom name="table" type="box" pos="0.5 0 -0.02" size="0.7 0.7 0.02" material="table"/>
    {cams["front"]}
    {chain}
    <body name="cube" pos="0.5 0 0.025">
      <freejoint name="cube"/>
      <geom name="cube" type="box" size="0.025 0.025 0.025" rgba="0.85 0.2 0.2 1" mass="0.1" friction="0.8 0.005 0.0001"/>
    </body>
    <body name="goal" mocap="true" pos="0.6 0.1 0.3">
      <geom name="goal" type="sphere" size="0.02" rgba="0.2 0.85 0.2 0.5" contype="0" conaffinity="0"/>
    </body>
  </worldbody>
  {actuators}
</mujoco>"""


@lru_cache(maxsize=8)
def _compiled(cameras: tuple[str, ...], image_size: int, timestep: float, max_faces: int | None) -> object:
    import mujoco

    xml = scene_xml(cameras, image_size, timestep)
    if not max_faces:
        return mujoco.MjModel.from_xml_string(xml)
    from protege.hardware.meshes import decimated_stl

    # visual meshes decimated (they are in metres: merge on a 1 mm grid), collision meshes as shipped
    d = _assets_dir() / "meshes"
    assets = {f"visual/{f.name}": decimated_stl(f, max_faces, 1e-3) for f in (d / "visual").glob("*.stl")}
    xml = xml.replace(f'meshdir="{d}"', 'meshdir="."').replace('file="collision/', f'file="{d}/collision/')
    return mujoco.MjModel.from_xml_string(xml, assets)


def load_model(cameras: tuple[str, ...] = (), image_size: int = 96, timestep: float = 0.002,
               max_faces: int | None = None):  # -> mujoco.MjModel
    """A fresh copy of the compiled scene (compiling the meshes once per process). `max_faces`: a copy
    for rendering, its visual meshes decimated to that many triangles each (~15x faster frames with
    OSMesa at ~100 px for 1000 faces: 134k triangles -> 10k; mean pixel difference < 1/255)."""
    import copy

    return copy.deepcopy(_compiled(tuple(cameras), int(image_size), float(timestep), max_faces))


# home posture: gripper pointing straight down at (0.45, 0, 0.3) m (solved once with `ik` below)
HOME_Q = np.array([0.0925, -0.26, -0.0896, -2.432, -0.0275, 0.6028, 0.0221])
# the gripper points straight down (world -z) with its fingers along world y
DOWN_QUAT = np.array([0.0, 1.0, 0.0, 0.0])


class PandaKinematics:
    """Forward and inverse kinematics of the Panda arm on its own MjData (never the simulated one)."""

    def __init__(self, model=None) -> None:  # noqa: ANN001 - mujoco.MjModel
        import mujoco

        self.mj = mujoco
        self.model = model if model is not None else load_model()
        self.data = mujoco.MjData(self.model)
        self.qadr = np.array([self.model.joint(j).qposadr[0] for j in ARM_JOINTS])
        self.dofadr = np.array([self.model.joint(j).dofadr[0] for j in ARM_JOINTS])
        self.site = self.model.site(EE_SITE).id
        self.lower = np.array([self.model.joint(j).range[0] for j in ARM_JOINTS])
        self.upper = np.array([self.model.joint(j).range[1] for j in ARM_JOINTS])
        self._jacp = np.zeros((3, self.model.nv))
        self._jacr = np.zeros((3, self.model.nv))

    def fk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """End-effector position (3,) and orientation quaternion (w, x, y, z) for joint angles q (7,)."""
        self.data.qpos[self.qadr] = q
        self.mj.mj_kinematics(self.model, self.data)
        quat = np.empty(4)
        self.mj.mju_mat2Quat(quat, self.data.site_xmat[self.site])
        return self.data.site_xpos[self.site].copy(), quat

    def ik(
        self,
        pos: np.ndarray,
        quat: np.ndarray | None,
        q_init: np.ndarray,
        iters: int = 20,
        damping: float = 1e-2,
        tol: float = 1e-4,
        null_gain: float = 0.05,
    ) -> np.ndarray:
        """Joint angles reaching `pos` (and `quat`, w-x-y-z, when given), starting from `q_init`;
        clipped to the joint limits. Damped least squares: dq = J^T (J J^T + d^2 I)^-1 e."""
        mj = self.mj
        q = np.clip(np.asarray(q_init, np.float64).copy(), self.lower, self.upper)
        err_rot = np.zeros(3)
        cur_quat, neg, dquat = np.empty(4), np.empty(4), np.empty(4)
        for _ in range(iters):
            self.data.qpos[self.qadr] = q
            mj.mj_kinematics(self.model, self.data)
            mj.mj_comPos(self.model, self.data)
            err_pos = pos - self.data.site_xpos[self.site]
            if quat is not None:
                mj.mju_mat2Quat(cur_quat, self.data.site_xmat[self.site])
                mj.mju_negQuat(neg, cur_quat)
                mj.mju_mulQuat(dquat, quat, neg)
                mj.mju_quat2Vel(err_rot, dquat, 1.0)
                err = np.concatenate([err_pos, err_rot])
            else:
                err = err_pos
            if np.linalg.norm(err) < tol:
                break
            mj.mj_jacSite(self.model, self.data, self._jacp, self._jacr, self.site)
            J = self._jacp[:, self.dofadr] if quat is None else np.vstack([self._jacp, self._jacr])[:, self.dofadr]
            JJt = J @ J.T + damping**2 * np.eye(len(err))
            dq = J.T @ np.linalg.solve(JJt, err)
            # null-space motion toward home keeps the elbow in a sane posture without disturbing the task
            N = np.eye(N_JOINTS) - np.linalg.pinv(J) @ J
            dq += N @ (null_gain * (HOME_Q - q))
            q = np.clip(q + dq, self.lower, self.upper)
        return q
