"""Replay buffer: one zarr v3 group holding every episode, time-major.

Layout (the data contract, see DESIGN.md)::

    <root>/data/<key>          (T_total, ...) one array per key, all episodes concatenated
    <root>/meta/episode_ends   (n_episodes,) int64, cumulative end index of each episode
    attrs: protege_format, fps, kinds {key: state|action|image|language}, units, provenance

Image keys (uint8 (T, H, W, C)) are stored one frame per chunk through a per-frame image codec
(JPEG quality 95 by default; PNG or raw on request), chosen when the buffer is created
(`ImageStorage`, see frames.py); the choice is kept in attrs["image_storage"]. Buffers written before
that (raw frames, Blosc, ~1 MB chunks) open and read exactly as before.

Crash safety: `append_episode` writes (and fully validates) the data arrays first and only then
extends `meta/episode_ends`. That last write is the commit point: a process killed at any moment
leaves data arrays that may be longer than `episode_ends[-1]`; the tail is ignored on open and
trimmed on the next append, so readers only ever see complete episodes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from protege.datasets.frames import ImageStorage, LazyFrames, Resized, describe_codec, frame_codec, read_frames
from protege.errors import DataError

FORMAT_VERSION = 1
KINDS = ("state", "action", "image", "language")
# ~1 MB chunks along time: large enough for fast sequential reads, small enough that an append
# (which rewrites the last partial chunk) stays cheap.
TARGET_CHUNK_BYTES = 1 << 20
# Frames a lazy source (e.g. JPEG rows of an hdf5 file) is read and written in: bounds memory.
LAZY_WRITE_FRAMES = 16


def infer_kind(key: str, arr: np.ndarray) -> str:
    """Default kind for a key: uint8 HWC arrays are images, `action` is action, `task` is language."""
    if key == "action" or key.startswith("action/"):
        return "action"
    if key == "task":
        return "language"
    if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):
        return "image"
    return "state"


def _store_repr(store: Any) -> str:
    return str(store) if isinstance(store, (str, Path)) else repr(store)


def _zarr_store(store: Any) -> Any:
    """What zarr opens: a `file://` URL becomes its local path, because zarr's fsspec store over the local
    filesystem does not create parent folders and fails on the first write into a new group."""
    if isinstance(store, str) and store.startswith("file://"):
        return store[len("file://"):]
    return store


class ReplayBuffer:
    """Episodes of named arrays over a zarr group (on disk / fsspec) or plain numpy (in memory).

    Create or open with `ReplayBuffer.create`, `ReplayBuffer.open` or `ReplayBuffer.open_or_create`;
    `ReplayBuffer.load` returns an in-memory copy for fast training.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        episode_ends: np.ndarray,
        attrs: Mapping[str, Any],
        group: zarr.Group | None = None,
        path: str = "<memory>",
    ) -> None:
        self.data = dict(data)
        self.episode_ends = np.asarray(episode_ends, dtype=np.int64)
        self.attrs = dict(attrs)
        self.group = group
        self.path = path

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        store: Any,
        fps: float,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        image_storage: ImageStorage | None = None,
    ) -> ReplayBuffer:
        """Create an empty buffer at `store` (path, URL or zarr store). Refuses to overwrite unless asked.
        `image_storage` says how image keys are stored (default: JPEG quality 95, original size)."""
        path = _store_repr(store)
        try:
            root = zarr.open_group(_zarr_store(store), mode="w" if overwrite else "w-")
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as e:
            raise DataError(path, None, "an empty location (or overwrite=True)", "existing data") from e
        meta = {"protege_format": FORMAT_VERSION, "fps": float(fps), "kinds": {}, "units": {}, "provenance": {}}
        meta.update(attrs or {})
        meta["image_storage"] = (image_storage or ImageStorage()).to_attrs()
        root.attrs.update(meta)
        root.require_group("data")
        root.require_group("meta").create_array(
            "episode_ends", shape=(0,), chunks=(1 << 16,), dtype="int64", fill_value=0
        )
        return cls({}, np.zeros(0, np.int64), meta, group=root, path=path)

    @classmethod
    def open(cls, store: Any, mode: str = "r", image_storage: ImageStorage | None = None) -> ReplayBuffer:
        """Open an existing buffer, validating its layout. `mode` is "r" (read-only) or "a" (append).
        `image_storage`, when given, must match how the buffer stores frames (a resumed collection)."""
        path = _store_repr(store)
        if isinstance(store, (str, Path)) and "://" not in str(store) and not Path(store).exists():
            raise DataError(path, None, "an existing replay buffer directory", "no such path")
        try:
            root = zarr.open_group(_zarr_store(store), mode="r" if mode == "r" else "r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError, ValueError) as e:
            raise DataError(path, None, "a zarr group (a protege replay buffer)", f"not a zarr group ({e})") from e
        attrs = dict(root.attrs)
        if "protege_format" not in attrs:
            raise DataError(path, "attrs/protege_format", "a protege replay buffer (group attr 'protege_format')",
                            f"a zarr group with attrs {sorted(attrs)}")
        if attrs["protege_format"] != FORMAT_VERSION:
            raise DataError(path, "attrs/protege_format", f"format version {FORMAT_VERSION}", str(attrs["protege_format"]))
        if "meta/episode_ends" not in root:
            raise DataError(path, "meta/episode_ends", "an int64 array of cumulative episode ends", "missing")
        if "data" not in root:
            raise DataError(path, "data", "a group of per-key arrays", "missing")
        data = {}
        for key in _array_keys(root["data"]):
            data[key] = root["data"][key]
        ends_arr = root["meta/episode_ends"]
        if ends_arr.ndim != 1 or ends_arr.dtype != np.int64:
            raise DataError(path, "meta/episode_ends", "a 1-D int64 array", f"{ends_arr.ndim}-D {ends_arr.dtype}")
        ends = _committed_prefix(np.asarray(ends_arr[:]))
        buf = cls(data, ends, attrs, group=root, path=path)
        buf._validate()
        has_frames = "image" in buf.kinds.values() and buf.n_steps
        if image_storage is not None and has_frames and image_storage != buf.image_storage:
            raise DataError(path, "attrs/image_storage", f"image storage {image_storage.spec()} (as asked)",
                            f"a buffer storing frames as {buf.image_storage.spec()}; use the same options or another output")
        return buf

    @classmethod
    def open_or_create(cls, store: Any, fps: float, attrs: Mapping[str, Any] | None = None,
                       image_storage: ImageStorage | None = None) -> ReplayBuffer:
        """Open for appending; create only where nothing exists yet (never inside an unrelated folder)."""
        try:
            return cls.open(store, mode="a", image_storage=image_storage)
        except DataError as e:
            is_path = isinstance(store, (str, Path)) and "://" not in str(store)
            if not (e.found == "no such path" or (not is_path and e.found.startswith("not a zarr group"))):
                raise
        return cls.create(store, fps=fps, attrs=attrs, image_storage=image_storage)

    @classmethod
    def load(cls, store: Any, keys: list[str] | None = None) -> ReplayBuffer:
        """Read a buffer (or only `keys`) fully into memory as numpy arrays: the training path."""
        src = store if isinstance(store, ReplayBuffer) else cls.open(store, "r")
        keys = list(src.data) if keys is None else keys
        for k in keys:
            src._require_key(k)
        n = src.n_steps
        data = {k: src.read(k, slice(0, n)) for k in keys}
        return cls(data, src.episode_ends.copy(), src.attrs, group=None, path=src.path)

    # ------------------------------------------------------------------ queries
    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1]) if len(self.episode_ends) else 0

    def __len__(self) -> int:
        return self.n_steps

    @property
    def fps(self) -> float:
        return float(self.attrs.get("fps", 0.0))

    @property
    def kinds(self) -> dict[str, str]:
        return dict(self.attrs.get("kinds", {}))

    def keys(self) -> list[str]:
        return list(self.data)

    @property
    def image_storage(self) -> ImageStorage:
        """How new image keys are stored (old buffers without the attr: the current default)."""
        return ImageStorage.from_attrs(self.attrs.get("image_storage"))

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0)

    def episode_slice(self, i: int) -> slice:
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"{self.path}: episode {i} out of range (n_episodes={self.n_episodes})")
        i %= self.n_episodes
        start = int(self.episode_ends[i - 1]) if i > 0 else 0
        return slice(start, int(self.episode_ends[i]))

    def get_episode(self, i: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        sl = self.episode_slice(i)
        return {k: self.read(k, sl) for k in (keys or self.data)}

    def read(self, key: str, index: int | slice | np.ndarray | list[int]) -> np.ndarray:
        """Decoded values of `key` at global step indices: an int, a slice, or an integer array of any
        shape (result: `index.shape + step shape`; repeats and any order allowed). Reads only the
        chunks holding those steps (image keys: one frame each) and decodes each once."""
        self._require_key(key)
        arr, n = self.data[key], self.n_steps
        if isinstance(index, slice):
            if isinstance(arr, np.ndarray):
                return arr[:n][index]
            index = np.arange(*index.indices(n))
        idx = np.asarray(index)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"{self.path} [{key}]: step indices must be integers, got {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx.min() if idx.min() < 0 else idx.max())
            raise IndexError(f"{self.path} [{key}]: step {bad} out of range (n_steps={n})")
        if idx.ndim == 0:
            return np.asarray(arr[int(idx)])
        if isinstance(arr, np.ndarray):
            return arr[idx]
        uniq, inverse = np.unique(idx.ravel(), return_inverse=True)
        return self._read_sorted(key, uniq)[inverse].reshape(*idx.shape, *arr.shape[1:])

    def _read_sorted(self, key: str, steps: np.ndarray) -> np.ndarray:
        arr = self.data[key]
        if frame_codec(arr) is not None:
            return read_frames(arr, steps, self.path)
        if not len(steps):
            return np.empty((0, *arr.shape[1:]), arr.dtype)
        # contiguous runs as basic slices: zarr's orthogonal (integer-array) selection gathers
        # every element of every chunk through fancy indexing, ~10x slower on frames
        cuts = np.flatnonzero(np.diff(steps) != 1) + 1
        return np.concatenate([np.asarray(arr[int(r[0]) : int(r[-1]) + 1]) for r in np.split(steps, cuts)])

    def read_steps(self, index: int | slice | np.ndarray | list[int], keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """`read` for several keys at once: {key: values at `index`} (default: every key)."""
        return {k: self.read(k, index) for k in (keys or self.data)}

    def episodes(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.n_episodes):
            yield self.get_episode(i)

    def __getitem__(self, key: str) -> Any:
        self._require_key(key)
        return self.data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    # ------------------------------------------------------------------ writing
    def append_episode(self, episode: Mapping[str, np.ndarray], kinds: Mapping[str, str] | None = None) -> None:
        """Validate every array, then append them; extending `meta/episode_ends` commits the episode."""
        if self.group is None:
            raise TypeError(f"{self.path}: in-memory buffers are read-only; open the store with mode='a'")
        if self.group.store.read_only:
            raise DataError(self.path, None, "a buffer opened for appending (mode='a')", "read-only")
        kinds = dict(kinds or {})
        episode = {k: self._prepare(k, v, kinds) for k, v in episode.items()}
        self._validate_episode(episode, kinds)
        n = self.n_steps
        length = len(next(iter(episode.values())))
        data_group = self.group["data"]
        new_kinds = dict(self.attrs.get("kinds", {}))
        for key, arr in episode.items():
            if key not in self.data:
                kind = kinds.get(key) or infer_kind(key, arr)
                self.data[key] = _create_array(data_group, key, arr, kind, self.image_storage)
                new_kinds[key] = kind
        if new_kinds != self.attrs.get("kinds"):  # before the data: a crash leaves no array without a kind
            self.group.attrs["kinds"] = new_kinds
            self.attrs["kinds"] = new_kinds
        for key, arr in episode.items():
            zarr_arr = self.data[key]
            zarr_arr.resize((n + length, *arr.shape[1:]))  # also trims an uncommitted tail
            _write(zarr_arr, n, arr)
        ends = self.group["meta/episode_ends"]
        ends.resize((self.n_episodes + 1,))
        ends[self.n_episodes] = n + length  # commit point
        self.episode_ends = np.append(self.episode_ends, n + length)

    def _prepare(self, key: str, value: Any, kinds: Mapping[str, str]) -> Any:
        """An episode value as written: numpy arrays (lazy frame sources stay lazy), image frames
        resized to the buffer's `resize` as they are read."""
        arr = value if isinstance(value, LazyFrames) else np.asarray(value)
        size = self.image_storage.resize
        kind = kinds.get(key) or self.kinds.get(key) or infer_kind(key, arr)
        if size and kind == "image" and arr.ndim == 4 and tuple(arr.shape[1:3]) != size:
            return Resized(arr, size)
        return arr

    def update_attrs(self, **attrs: Any) -> None:
        if self.group is not None:
            self.group.attrs.update(attrs)
        self.attrs.update(attrs)

    # ------------------------------------------------------------------ validation
    def _require_key(self, key: str) -> None:
        if key not in self.data:
            close = difflib.get_close_matches(key, list(self.data), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(self.path, key, f"one of the buffer keys {sorted(self.data)}", f"no such key{hint}")

    def _validate(self) -> None:
        n = self.n_steps
        if len(self.episode_ends) and (self.episode_lengths <= 0).any():
            bad = int(np.argmax(self.episode_lengths <= 0))
            raise DataError(self.path, "meta/episode_ends", "strictly increasing cumulative episode ends",
                            f"{self.episode_ends[bad]} at episode {bad}")
        for key, arr in self.data.items():
            if arr.shape[0] < n:
                raise DataError(self.path, f"data/{key}", f"at least {n} steps (meta/episode_ends[-1])", f"{arr.shape[0]} steps")
        kinds = self.attrs.get("kinds", {})
        for key in self.data:
            if kinds.get(key) not in KINDS:
                raise DataError(self.path, f"attrs/kinds/{key}", f"one of {KINDS}", repr(kinds.get(key)))
        if self.data and "action" not in self.data:
            raise DataError(self.path, "data/action", "an 'action' array", f"keys {sorted(self.data)}")

    def _validate_episode(self, episode: dict[str, np.ndarray], kinds: Mapping[str, str]) -> None:
        where = self.path
        if not episode:
            raise DataError(where, None, "an episode with at least an 'action' array", "no arrays")
        if self.data:
            extra = sorted(set(episode) - set(self.data))  # first: a misspelling shows up as unknown + missing
            if extra:
                close = difflib.get_close_matches(extra[0], list(self.data), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DataError(where, extra[0], f"only the buffer keys {sorted(self.data)}", f"unknown key{hint}")
            missing = sorted(set(self.data) - set(episode))
            if missing:
                raise DataError(where, missing[0], f"every buffer key {sorted(self.data)} in the episode", "key missing")
        elif "action" not in episode:
            raise DataError(where, "action", "an 'action' array in every episode", f"keys {sorted(episode)}")
        check_episode_arrays(where, episode)
        for key, arr in episode.items():
            kind = kinds.get(key) or self.kinds.get(key) or infer_kind(key, arr)
            if kind not in KINDS:
                raise DataError(where, f"kinds/{key}", f"one of {KINDS}", repr(kind))
            if kind == "image" and arr.dtype != np.uint8:
                raise DataError(where, key, "uint8 images (T, H, W, C)", f"dtype {arr.dtype}")
            if kind == "image" and (arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4)):
                raise DataError(where, key, "images (T, H, W, C) with 1, 3 or 4 channels", f"shape {tuple(arr.shape)}")
            if key in self.data:
                existing = self.data[key]
                if tuple(arr.shape[1:]) != tuple(existing.shape[1:]):
                    raise DataError(where, key, f"per-step shape {tuple(existing.shape[1:])}", f"{tuple(arr.shape[1:])}")
                if not np.can_cast(arr.dtype, existing.dtype, casting="same_kind"):
                    raise DataError(where, key, f"dtype castable to {existing.dtype}", f"dtype {arr.dtype}")

    def validate_data(self) -> None:
        """Read every committed value, one episode at a time, through the same checks as an append."""
        names = {k: f"data/{k}" for k in self.data}
        for i in range(self.n_episodes):
            check_episode_arrays(f"{self.path} (episode {i})", self.get_episode(i), names)

    # ------------------------------------------------------------------ display
    def summary(self, stats: bool = False) -> str:
        """Human-readable overview; `stats` adds min/mean/max of every non-image key (reads them)."""
        lengths = self.episode_lengths
        lines = [
            f"replay buffer {self.path}",
            f"  episodes: {self.n_episodes}  steps: {self.n_steps}  fps: {self.fps:g}",
        ]
        if self.n_episodes:
            lines.append(f"  episode length: min {lengths.min()}  mean {lengths.mean():.1f}  max {lengths.max()}")
        lines.append("  keys:")
        for key, arr in self.data.items():
            kind = self.kinds.get(key, "?")
            chunks = getattr(arr, "chunks", None)
            storage = f" {describe_codec(arr)}" if kind == "image" and chunks else ""
            lines.append(f"    {key:<24} {kind:<8} shape {(self.n_steps, *arr.shape[1:])!s:<20} {arr.dtype!s:<8}"
                         + (f" chunks {chunks}" if chunks else "") + storage)
            if stats and kind != "image" and self.n_steps:
                x = np.asarray(arr[: self.n_steps], dtype=np.float64).reshape(self.n_steps, -1)
                fmt = lambda v: np.array2string(v[:8], precision=3, separator=", ") + (" ..." if len(v) > 8 else "")  # noqa: E731
                lines.append(f"      min {fmt(x.min(0))}  mean {fmt(x.mean(0))}  max {fmt(x.max(0))}")
        lines += self._summary_tasks() + self._summary_filter_keys()
        for name in ("units", "provenance"):
            if self.attrs.get(name):
                lines.append(f"  {name}: {self.attrs[name]}")
        return "\n".join(lines)

    def _summary_tasks(self) -> list[str]:
        """Instruction strings (attrs["tasks"], indexed by data/task) with how many steps use each."""
        tasks = list(self.attrs.get("tasks") or [])
        if not tasks:
            return []
        counts = np.zeros(len(tasks), np.int64)
        if "task" in self.data and self.n_steps:
            idx = self.read("task", slice(None)).astype(np.int64).ravel()
            counts = np.bincount(idx[(idx >= 0) & (idx < len(tasks))], minlength=len(tasks))
        lines = [f"  tasks ({len(tasks)} instructions; steps):"]
        lines += [f"    {i:>3}  {int(c):>8}  {t!r}" for i, (t, c) in enumerate(zip(tasks, counts))]
        return lines

    def _summary_filter_keys(self) -> list[str]:
        """robomimic filter keys (mask/train, mask/valid, ...: episode index lists in attrs["robomimic"])."""
        masks = (self.attrs.get("robomimic") or {}).get("mask") or {}
        if not masks:
            return []
        lines = [f"  filter keys (robomimic masks; episodes of {self.n_episodes}):"]
        lines += [f"    {name:<20} {len(idx):>6}" for name, idx in sorted(masks.items())]
        return lines


def check_episode_arrays(where: object, arrays: Mapping[str, np.ndarray], names: Mapping[str, str] | None = None) -> None:
    """The checks every episode needs, wherever it comes from: time-major numeric arrays, all as long
    as 'action', finite, at least one step. Errors name `names[key]` when given (an adapter passes
    the source dataset's own key, e.g. 'data/demo_3/actions'), else the buffer key."""
    name = lambda k: (names or {}).get(k, k)  # noqa: E731
    n = len(arrays["action"]) if arrays["action"].ndim else -1
    for key, arr in arrays.items():
        if arr.ndim == 0:
            raise DataError(where, name(key), "a time-major array (T, ...)", "a scalar")
        if len(arr) != n:
            raise DataError(where, name(key), f"{n} steps (same as {name('action')!r})", f"{len(arr)} steps")
        if arr.dtype.kind not in "biuf":
            raise DataError(where, name(key), "a numeric (bool/int/float) array", f"dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = tuple(int(b) for b in np.argwhere(~np.isfinite(arr))[0])
            raise DataError(where, name(key), "finite values", f"{arr[bad]} at index {bad}")
    if n == 0:
        raise DataError(where, name("action"), "an episode with at least one step", "an empty episode (0 steps)")


def _array_keys(group: zarr.Group, prefix: str = "") -> list[str]:
    """Keys of all arrays below `group`, nested groups joined with '/' (e.g. 'obs/state')."""
    keys = []
    for name, node in sorted(group.members()):
        if isinstance(node, zarr.Group):
            keys += _array_keys(node, f"{prefix}{name}/")
        else:
            keys.append(prefix + name)
    return keys


def _committed_prefix(ends: np.ndarray) -> np.ndarray:
    """Drop a last episode_ends entry that was resized but never written (a crash mid-commit reads
    back as the fill value 0, i.e. not after the previous end)."""
    ends = ends.astype(np.int64)
    if len(ends) and ends[-1] <= (ends[-2] if len(ends) > 1 else 0):
        ends = ends[:-1]
    return ends


def _create_array(group: zarr.Group, key: str, first: Any, kind: str, storage: ImageStorage) -> zarr.Array:
    # nested keys ('obs/state') create intermediate groups
    parent, _, name = key.rpartition("/")
    g = group.require_group(parent) if parent else group
    step_shape = tuple(first.shape[1:])
    if kind == "image":
        # One frame per chunk (see frames.py). Raw frames: lossless byte shuffle + zstd-1.
        serializer = storage.serializer(step_shape[-1])
        return g.create_array(
            name, shape=(0, *step_shape), chunks=(1, *step_shape),
            dtype=first.dtype, fill_value=0, serializer=serializer or "auto",
            compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle") if serializer is None else None,
        )
    step_bytes = max(1, int(np.prod(step_shape)) * first.dtype.itemsize)
    chunk_len = int(max(1, TARGET_CHUNK_BYTES // step_bytes))
    codec = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=first.dtype.itemsize)
    return g.create_array(name, shape=(0, *step_shape), chunks=(chunk_len, *step_shape), dtype=first.dtype,
                          compressors=codec, fill_value=0)


def _write(arr: zarr.Array, start: int, values: Any) -> None:
    """Write `values` at steps [start, start + len). A lazy frame source is read and written a
    block of frames at a time, aligned to chunk boundaries so no chunk is rewritten: memory stays
    at a few frames, not an episode."""
    if not isinstance(values, LazyFrames):
        arr[start : start + len(values)] = values.astype(arr.dtype, copy=False)
        return
    block = arr.chunks[0] * max(1, LAZY_WRITE_FRAMES // arr.chunks[0])
    pos = 0
    while pos < len(values):
        end = min(len(values), pos + block - (start + pos) % block)
        arr[start + pos : start + end] = values[pos:end]
        pos = end
