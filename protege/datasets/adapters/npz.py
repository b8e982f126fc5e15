"""A folder of per-episode `.npz` files -> replay buffer, with a key mapping.

Each file holds time-major arrays of one episode. `key_map` maps buffer keys to npz keys, e.g.
`{"obs/state": "observations", "action": "actions", "obs/front": "rgb"}`; without one, npz keys
are used as they are and must include `action`. Files are taken in natural order of their names
(ep2 before ep10).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from protege.datasets.replay_buffer import check_episode_arrays
from protege.errors import DataError


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def detect(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.npz"))


class Reader:
    def __init__(self, path: Path, key_map: dict[str, str] | None = None, fps: float = 10.0) -> None:
        if not path.is_dir():
            raise DataError(path, None, "a folder of per-episode .npz files", "not a directory")
        self.path = path
        self.files = sorted(path.glob("*.npz"), key=_natural)
        if not self.files:
            raise DataError(path, None, "per-episode .npz files", "none")
        self.key_map = dict(key_map) if key_map else {k: k for k in self._load(self.files[0]).files}
        if "action" not in self.key_map:
            raise DataError(self.files[0], "action", "an 'action' entry (npz key or key_map['action'])", f"keys {sorted(self.key_map)}")
        self.fps = float(fps)
        self.n_episodes = len(self.files)
        self.kinds: dict[str, str] = {}
        self.attrs = {"provenance": {"source": str(path.resolve()), "adapter": "npz", "key_map": self.key_map}}

    @staticmethod
    def _load(file: Path) -> np.lib.npyio.NpzFile:
        try:
            return np.load(file, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(file, None, "a readable .npz file", f"unreadable ({e})") from e

    def read_episode(self, i: int) -> dict[str, np.ndarray]:
        file = self.files[i]
        with self._load(file) as z:
            missing = [src for src in self.key_map.values() if src not in z.files]
            if missing:
                raise DataError(file, missing[0], f"npz keys {sorted(self.key_map.values())}", f"keys {sorted(z.files)}")
            try:
                arrays = {dst: np.asarray(z[src]) for dst, src in self.key_map.items()}
            except (ValueError, zipfile.BadZipFile, OSError) as e:
                raise DataError(file, None, "readable arrays", f"a read error ({e})") from e
        check_episode_arrays(file, arrays, self.key_map)  # errors name the npz key
        return arrays

    def close(self) -> None:
        pass
