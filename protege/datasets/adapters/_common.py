"""Checks shared by the format readers: every failure names the file, the key, expected and found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from protege.errors import DataError


def open_h5(path: Path) -> Any:
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(path, None, "a readable HDF5 file", f"unreadable ({e})") from e


def h5_array(f: Any, key: str, path: Path) -> np.ndarray:
    """Read dataset `key` from an open HDF5 file, or fail naming it."""
    if key not in f:
        raise DataError(path, key, "an HDF5 dataset", "missing")
    node = f[key]
    if not hasattr(node, "dtype"):
        raise DataError(path, key, "an HDF5 dataset", f"a {type(node).__name__}")
    try:
        return np.asarray(node[()])
    except (OSError, KeyError, ValueError) as e:  # truncated file, broken chunk
        raise DataError(path, key, "readable data", f"a read error ({e})") from e


def check_images(path: Path, key: str, arr: np.ndarray, shape: tuple[int, ...] | None) -> None:
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise DataError(path, key, "images (T, H, W, C)", f"shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise DataError(path, key, "uint8 images", f"dtype {arr.dtype}")
    if shape is not None and arr.shape[1:] != shape:
        raise DataError(path, key, f"images of size {shape} (as in earlier episodes)", f"{arr.shape[1:]}")
