"""ALOHA / ACT / act-plus-plus hdf5 -> replay buffer.

Layout (ACT's `record_sim_episodes.py`, ALOHA's and mobile ALOHA's `record_episodes.py`): a folder
of `episode_<N>.hdf5`, each::

    attrs: sim (bool), compress (bool, real recordings)
    /observations/qpos            (T, 14)  float
    /observations/qvel            (T, 14)  float
    /observations/effort          (T, 14)  float         real robots (motor currents)
    /observations/images/<camera> (T, H, W, 3) uint8     raw frames, e.g. top, left_wrist, cam_high
                                  (T, L) uint8           compress=True: JPEG bytes zero-padded to L
                                  (T, H, W) uint16 ...   depth cameras: kept raw
    /compress_len                 (n_cams, T) float      compress=True: JPEG length of each row
    /action                       (T, 14)  float
    /base_action                  (T, 2)   float         mobile ALOHA: base linear, angular velocity

Bimanual 14-D layout of qpos and action: [left waist, shoulder, elbow, forearm_roll, wrist_angle,
wrist_rotate, left gripper, right (same six joints), right gripper]; grippers are normalised
(0 closed .. 1 open in ACT's sim). Mapping: qpos -> `obs/state`, qvel -> `obs/qvel`, effort ->
`obs/effort`, images/<camera> -> `obs/<camera>`, action -> `action`, base_action -> `base_action`.
Control rate 50 Hz.

Compressed recordings: the recorder ran `cv2.imencode('.jpg', frame)` on the RGB array, which
OpenCV takes for BGR; `cv2.imdecode` hands the channels back in the order they were encoded, so
decoding with OpenCV returns exactly the stored RGB (a decoder that converts to RGB itself would
swap red and blue). The rows of `compress_len` follow the recorder's camera list, which the file
does not store; the order is the one whose lengths match the JPEG streams of the first frame
(ALOHA's cam_high, cam_low, cam_left_wrist, cam_right_wrist order first). Frames are read, checked
and decoded a few at a time while the episode is written (`LazyFrames`): memory stays at a few
frames, not an episode.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np

from protege.datasets.adapters._common import h5_array, open_h5
from protege.datasets.frames import LazyFrames
from protege.datasets.replay_buffer import check_episode_arrays
from protege.errors import DataError

_EPISODE = re.compile(r"^episode_(\d+)\.hdf5$")
JOINT_NAMES = [f"{side}_{j}" for side in ("left", "right")
               for j in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")]
# ALOHA / act-plus-plus constants.py camera_names: the order of the rows of /compress_len
RECORDER_CAMERA_ORDER = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")
LOW_DIM = {"obs/state": "observations/qpos", "obs/qvel": "observations/qvel", "obs/effort": "observations/effort",
           "action": "action", "base_action": "base_action"}
OPTIONAL = ("obs/effort", "base_action")
JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


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
            self.optional = [k for k in OPTIONAL if LOW_DIM[k] in f]  # effort, base_action: kept when recorded
        self.fps = fps
        self.n_episodes = len(self.files)
        self.kinds = {"obs/state": "state", "obs/qvel": "state", "obs/effort": "state", "action": "action",
                      "base_action": "action"}
        self.attrs = {
            "provenance": {"source": str(path.resolve()), "adapter": "aloha", "sim": sim},
            "units": {"obs/state": "joint positions (rad), grippers normalised", "action": "absolute joint targets",
                      "joint_names": JOINT_NAMES,
                      **({"obs/effort": "joint efforts as recorded (motor currents)"} if "obs/effort" in self.optional else {}),
                      **({"base_action": "mobile base (linear m/s, angular rad/s)"} if "base_action" in self.optional else {})},
        }
        self._image_shapes: dict[str, tuple[int, ...]] = {}

    def read_episode(self, i: int) -> dict[str, Any]:
        """Low-dim arrays in memory; camera frames as `LazyFrames` read while the episode is written."""
        file = self.files[i]
        with open_h5(file) as f:
            keys = ["obs/state", "obs/qvel", "action", *self.optional]
            arrays: dict[str, Any] = {k: h5_array(f, LOW_DIM[k], file) for k in keys}
            for key in ("obs/state", "action"):
                if arrays[key].ndim != 2:
                    raise DataError(file, LOW_DIM[key], "a (T, 14) array", f"shape {arrays[key].shape}")
            cams = sorted(f["observations/images"]) if "observations/images" in f else []
            if cams != self.cameras:
                raise DataError(file, "observations/images", f"cameras {self.cameras} (as in {self.files[0].name})", f"{cams}")
            compressed = bool(f.attrs.get("compress", False))
            jpeg_cams = [c for c in cams if compressed and f[f"observations/images/{c}"].ndim == 2]
            lengths = _jpeg_lengths(f, file, jpeg_cams) if jpeg_cams else {}
            for c in cams:
                arrays[f"obs/{c}"] = self._camera(f, file, c, lengths.get(c))
        names = {k: LOW_DIM.get(k, f"observations/images/{k[4:]}") for k in arrays}
        check_episode_arrays(file, arrays, names)  # errors name the source file and key
        return arrays

    def _camera(self, f: Any, file: Path, cam: str, lengths: np.ndarray | None) -> LazyFrames:
        key = f"observations/images/{cam}"
        node = f[key]
        if lengths is not None:
            frames: LazyFrames = JpegRows(file, key, lengths, _decode(file, key, 0, node[0], int(lengths[0])).shape)
        else:
            if node.ndim < 3:
                raise DataError(file, key, "images (T, H, W, C), depth (T, H, W) or, with attrs['compress'], JPEG rows (T, L)",
                                f"shape {node.shape}" + ("" if f.attrs.get("compress", False) else " without attrs['compress']"))
            frames = H5Frames(file, key, node.shape, node.dtype)  # colour (T, H, W, C) or depth (T, H, W): raw
        shape = frames.shape[1:]
        if self._image_shapes.get(cam, shape) != shape:
            raise DataError(file, key, f"images of size {self._image_shapes[cam]} (as in earlier episodes)", f"{shape}")
        self._image_shapes[cam] = shape
        # colour frames are images (stored with the buffer's image codec); depth stays raw, lossless
        self.kinds[f"obs/{cam}"] = "image" if frames.ndim == 4 and frames.dtype == np.uint8 and shape[-1] in (1, 3, 4) else "state"
        return frames

    def close(self) -> None:
        pass


class H5Frames(LazyFrames):
    """Raw frames of an hdf5 dataset, read a block at a time."""

    def __init__(self, file: Path, key: str, shape: tuple[int, ...], dtype: Any) -> None:
        super().__init__(shape, dtype)
        self.file, self.key = file, key

    def __getitem__(self, sl: slice) -> np.ndarray:
        with open_h5(self.file) as f:
            try:
                return np.asarray(f[self.key][sl])
            except (OSError, KeyError, ValueError) as e:  # truncated file, broken chunk
                raise DataError(self.file, f"{self.key} frames {sl.start}:{sl.stop}", "readable data", f"a read error ({e})") from e


class JpegRows(LazyFrames):
    """act-plus-plus compressed frames: row t of the (T, L) uint8 dataset holds a JPEG of
    `lengths[t]` bytes, zero-padded to L. Decoded a block at a time, each frame checked."""

    def __init__(self, file: Path, key: str, lengths: np.ndarray, frame_shape: tuple[int, ...]) -> None:
        super().__init__((len(lengths), *frame_shape))
        self.file, self.key, self.lengths = file, key, lengths

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(len(self))
        with open_h5(self.file) as f:
            try:
                rows = np.asarray(f[self.key][start:stop])
            except (OSError, KeyError, ValueError) as e:
                raise DataError(self.file, f"{self.key} frames {start}:{stop}", "readable data", f"a read error ({e})") from e
        out = np.empty((stop - start, *self.shape[1:]), np.uint8)
        for j, row in enumerate(rows):
            t = start + j
            frame = _decode(self.file, self.key, t, row, int(self.lengths[t]))
            if frame.shape != self.shape[1:]:
                raise DataError(self.file, f"{self.key} frame {t}", f"a frame of shape {self.shape[1:]} (as frame 0)", f"{frame.shape}")
            out[j] = frame
        return out


def _decode(file: Path, key: str, t: int, row: np.ndarray, length: int) -> np.ndarray:
    """One JPEG row -> (H, W, C) in the channel order it was encoded with (see module docstring)."""
    import cv2

    where = f"{key} frame {t}"
    if length > len(row):
        raise DataError(file, where, f"compress_len at most the row length {len(row)}", f"compress_len {length}")
    data = row[:length]
    if length < 4 or bytes(data[:2]) != JPEG_SOI:
        raise DataError(file, where, "a JPEG stream (starts with FF D8)", f"{length} bytes starting {bytes(data[:4]).hex(' ')}")
    if bytes(data[-2:]) != JPEG_EOI:  # OpenCV decodes a cut stream into a partly grey frame without an error
        raise DataError(file, where, "a complete JPEG stream (ends with FF D9)", f"a truncated JPEG ({length} bytes)")
    frame = cv2.imdecode(data, cv2.IMREAD_COLOR)  # the flag act-plus-plus decodes with
    if frame is None:
        raise DataError(file, where, "a decodable JPEG", "undecodable bytes")
    return frame


def _jpeg_lengths(f: Any, file: Path, cams: list[str]) -> dict[str, np.ndarray]:
    """{camera: JPEG length of each frame} from /compress_len, whose rows follow the recorder's
    camera list (not stored): take the first camera order whose lengths fit the first frame's streams."""
    raw = h5_array(f, "compress_len", file)
    T = f[f"observations/images/{cams[0]}"].shape[0]
    if raw.ndim != 2 or raw.shape[0] < len(cams) or raw.shape[1] != T:
        raise DataError(file, "compress_len", f"a ({len(cams)}, {T}) array (cameras x frames)", f"shape {raw.shape}")
    if not np.isfinite(raw).all() or (raw < 0).any() or (raw != np.round(raw)).any():
        raise DataError(file, "compress_len", "non-negative whole byte counts", "other values")
    lengths = raw.astype(np.int64)
    first = {c: f[f"observations/images/{c}"][0] for c in cams}
    true_len = {c: len(np.trim_zeros(row, "b")) for c, row in first.items()}  # a JPEG ends with D9, never 0
    preferred = sorted(cams, key=lambda c: (RECORDER_CAMERA_ORDER.index(c) if c in RECORDER_CAMERA_ORDER else len(RECORDER_CAMERA_ORDER), cams.index(c)))
    candidates = [preferred]
    if len(cams) <= 6:
        candidates += [list(p) for p in itertools.permutations(preferred)]
    for order in candidates:
        rows = {c: r for r, c in enumerate(order)}
        if all(lengths[rows[c], 0] == true_len[c] for c in cams):
            break
    else:  # nothing fits (e.g. a bad first frame): the recorder's order; the frame checks then say what is wrong
        rows = {c: r for r, c in enumerate(preferred)}
    return {c: lengths[rows[c]] for c in cams}
