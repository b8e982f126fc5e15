"""The bimanual ALOHA robot model (two ViperX 300s arms in ACT's scene): MJCF from the `gym-aloha`
package, ACT's start pose and gripper normalisation. Shared by the simulated tasks (protege/envs/aloha.py)
and the HAL robot (protege/hardware/aloha_robot.py); it lives in the hardware layer because tasks build
on robots, not the other way round."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from protege.errors import ConfigError

TASKS = ("transfer_cube", "insertion")
CAMERAS = ("top", "angle", "left_wrist", "right_wrist", "left_pillar", "right_pillar", "front_close")
FPS = 50
N_SUBSTEPS = 10  # control step 20 ms / MuJoCo timestep 2 ms (as in ACT)
# ACT's arm start pose (6 joints + 2 finger slides per arm)
START_ARM_POSE = np.array([0, -0.96, 1.16, 0, -0.3, 0, 0.02239, -0.02239] * 2)
# ACT's normalisation of the finger slide position (0: closed, 1: open)
GRIPPER_CLOSE, GRIPPER_OPEN = 0.01844, 0.05800


def normalize_gripper(x: np.ndarray | float) -> np.ndarray | float:
    return (x - GRIPPER_CLOSE) / (GRIPPER_OPEN - GRIPPER_CLOSE)


def unnormalize_gripper(x: np.ndarray | float) -> np.ndarray | float:
    return x * (GRIPPER_OPEN - GRIPPER_CLOSE) + GRIPPER_CLOSE


def assets_dir() -> Path:
    """gym-aloha's asset folder, found without importing the package (its envs pull in dm_control)."""
    spec = importlib.util.find_spec("gym_aloha")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the ALOHA tasks need the `gym-aloha` package for their robot meshes: pip install gym-aloha")
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def load_model(task: str, end_effector: bool = False, max_faces: int | None = None) -> Any:
    """The MjModel of a task: joint-position actuators, or (`end_effector`) mocap-welded grippers.
    `max_faces` decimates every mesh to at most that many triangles (a model for rendering only)."""
    import mujoco

    name = f"bimanual_viperx_{'end_effector_' if end_effector else ''}{task}.xml"
    folder = assets_dir()
    assets = {p.name: _decimated_stl(p, max_faces) for p in folder.glob("vx300s_*.stl")} if max_faces else None
    model = mujoco.MjModel.from_xml_path(str(folder / name), assets)
    model.vis.quality.offsamples = 0  # no multisampling: software GL is slow enough
    return model


def _decimated_stl(path: Path, max_faces: int) -> bytes:
    """The ViperX STLs are in mm: merge vertices on a 1 mm grid, then simplify (`meshes.decimated_stl`)."""
    from protege.hardware.meshes import decimated_stl

    return decimated_stl(path, max_faces, grid=1.0)
