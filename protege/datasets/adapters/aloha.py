"""ALOHA / ACT hdf5 -> replay buffer.

Layout (ACT's `record_sim_episodes.py` / ALOHA's recorder): a folder of `episode_<N>.hdf5`, each::

    attrs: sim (bool)
    /observations/qpos            (T, 14)  float
    /observations/qvel            (T, 14)  float
    /observations/images/<camera> (T, H, W, 3) uint8   e.g. top, left_wrist, right_wrist
    /action                       (T, 14)  float

Bimanual 14-D layout of qpos and action: [left waist, shoulder, elbow, forearm_roll, wrist_angle,
wrist_rotate, left gripper, right (same six joints), right gripper]; grippers are normalised
(0 closed .. 1 open in ACT's sim). Mapping: qpos -> `obs/state`, qvel -> `obs/qvel`,
images/<camera> -> `obs/<camera>`, action -> `action`. Control rate 50 Hz.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from protege.datasets.adapters._common import check_images, h5_array, open_h5
from protege.datasets.replay_buffer import check_episode_arrays
from protege.errors import DataError

_EPISODE = re.compile(r"^episode_(\d+)\.hdf5$")
JOINT_NAMES = [f"{side}_{j}" for side in ("left", "right")
               for j in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")]


def _episode_files(path: Path) -> list[Path]:
    files = [p for p in path.iterdir() if _EPISODE.match(p.name)]
    return sorted(files, key=lambda p: int(_EPISODE.match(p.name).group(1)))


def detect(path: Path) -> bool:
    return path.is_dir() and bool(_episode_files(path))


class Reader:
    def __init__(self, path: Path, fps: float = 50.0) -> None:
        if not path.is_dir():
            raise DataError(path, None, "a folder of episode_<N>.hdf5 files (ALOHA layout)", "not a directory")
        self.path = path
        self.files = _episode_files(path)
        if not self.files:
            raise DataError(path, None, "episode_<N>.hdf5 files", "none")
        indices = [int(_EPISODE.match(p.name).group(1)) for p in self.files]
        dup = {i for i in indices if indices.count(i) > 1}
        if dup:  # e.g. episode_3.hdf5 and episode_03.hdf5
            raise DataError(path, f"episode_{min(dup)}.hdf5", "one file per episode index", f"{indices.count(min(dup))} files")
        with open_h5(self.files[0]) as f:
            sim = bool(f.attrs.get("sim", False))
            self.cameras = sorted(f["observations/images"]) if "observations/images" in f else []
        self.fps = fps
        self.n_episodes = len(self.files)
        self.kinds = {"obs/state": "state", "obs/qvel": "state", "action": "action"}
        self.attrs = {
            "provenance": {"source": str(path.resolve()), "adapter": "aloha", "sim": sim},
            "units": {"obs/state": "joint positions (rad), grippers normalised", "action": "absolute joint targets",
                      "joint_names": JOINT_NAMES},
        }
        self._image_shapes: dict[str, tuple[int, ...]] = {}

    def read_episode(self, i: int) -> dict[str, np.ndarray]:
        file = self.files[i]
        with open_h5(file) as f:
            sources = {"obs/state": "observations/qpos", "obs/qvel": "observations/qvel", "action": "action"}
            cams = sorted(f["observations/images"]) if "observations/images" in f else []
            if cams != self.cameras:
                raise DataError(file, "observations/images", f"cameras {self.cameras} (as in {self.files[0].name})", f"{cams}")
            sources.update({f"obs/{c}": f"observations/images/{c}" for c in cams})
            arrays = {k: h5_array(f, src, file) for k, src in sources.items()}
        for key in ("obs/state", "action"):
            if arrays[key].ndim != 2:
                raise DataError(file, sources[key], "a (T, 14) array", f"shape {arrays[key].shape}")
        for c in cams:
            check_images(file, sources[f"obs/{c}"], arrays[f"obs/{c}"], self._image_shapes.get(c))
            self._image_shapes[c] = arrays[f"obs/{c}"].shape[1:]
        check_episode_arrays(file, arrays, sources)  # errors name the source file and key
        return arrays

    def close(self) -> None:
        pass
