"""Lighter copies of robot meshes for camera rendering (physics keeps the originals).

Robot arm meshes carry ~10-30k triangles per link: software GL (OSMesa) spends most of a small frame
transforming them, and at ~100 px a few hundred per link look the same."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=64)
def decimated_stl(path: Path, max_faces: int, grid: float = 1.0) -> bytes:
    """A binary STL with at most `max_faces` triangles (quadric edge collapse, fast-simplification).

    Vertices are first merged on a `grid` (in the file's length unit: 1.0 for STLs in mm, 1e-3 for
    STLs in m): it fuses the fine detail (and duplicate vertices) that quadric simplification alone
    cannot collapse on these meshes."""
    import fast_simplification

    raw = path.read_bytes()
    n = int(np.frombuffer(raw, np.uint32, 1, 80)[0])
    rec = np.dtype([("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    tri = np.frombuffer(raw, rec, n, 84)["v"].reshape(-1, 3)
    points, faces = np.unique(np.round(tri / grid) * grid, axis=0, return_inverse=True)
    faces = faces.reshape(-1, 3)
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    if len(faces) > max_faces:
        points, faces = fast_simplification.simplify(points, faces, target_count=max_faces)
    out = np.zeros(len(faces), rec)
    out["v"] = points[faces]
    return raw[:80] + np.uint32(len(faces)).tobytes() + out.tobytes()
