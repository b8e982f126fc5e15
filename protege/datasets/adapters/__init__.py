"""Source formats -> replay buffer, one module per format, one resumable conversion loop for all.

Each format module provides a `Reader(path, **options)` with `n_episodes`, `fps`, `attrs` (metadata
for the buffer: provenance, units, ...), `kinds` and `read_episode(i) -> {key: array}`; and
`detect(path) -> bool` for `protege convert` to guess the format. Episodes are read, validated and
committed one at a time, so memory stays bounded by one episode and an interrupted conversion
resumes where it stopped (episodes already in the output are skipped).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from protege.datasets.frames import ImageStorage
from protege.datasets.replay_buffer import ReplayBuffer
from protege.errors import DataError


@dataclass(frozen=True)
class Format:
    module: str  # imported on first use (lerobot's reader pulls pyarrow/av)
    summary: str
    exports: bool = False  # the module has `export(buffer, out) -> Path` (`protege convert --to <name>`)


FORMATS: dict[str, Format] = {
    "lerobot": Format("protege.datasets.adapters.lerobot", "LeRobot v2.1/v3 dataset folder", exports=True),
    "robomimic": Format("protege.datasets.adapters.robomimic", "robomimic hdf5 (data/demo_<N>)", exports=True),
    "aloha": Format("protege.datasets.adapters.aloha", "ALOHA/ACT hdf5 episode folder"),
    "npz": Format("protege.datasets.adapters.npz", "folder of per-episode .npz files"),
}
FORMAT_NAMES = tuple(FORMATS)
EXPORT_NAMES = tuple(n for n, f in FORMATS.items() if f.exports)


def format_module(name: str, src: str | Path | None = None) -> Any:
    if name not in FORMATS:
        raise DataError(src or name, None, f"a format in {FORMAT_NAMES}", repr(name))
    return importlib.import_module(FORMATS[name].module)


def export(buffer: ReplayBuffer, fmt: str, out: str | Path) -> Path:
    """Write `buffer` in the format `fmt` (one of EXPORT_NAMES) at `out`."""
    if fmt not in EXPORT_NAMES:
        raise DataError(out, None, f"an export format in {EXPORT_NAMES}", repr(fmt))
    return format_module(fmt).export(buffer, out)


def detect_format(src: str | Path) -> str:
    src = Path(src)
    if not src.exists():
        raise DataError(src, None, "an existing file or directory to convert", "no such path")
    for name in FORMATS:
        if format_module(name).detect(src):
            return name
    raise DataError(src, None, f"a dataset in one of the formats {FORMAT_NAMES} (or pass --format)", "no known layout")


def open_reader(src: str | Path, fmt: str | None = None, **options: Any) -> Any:
    fmt = fmt or detect_format(src)
    return format_module(fmt, src).Reader(Path(src), **options)


def convert(src: str | Path, out: str | Path, fmt: str | None = None, progress: bool = True,
            image_storage: ImageStorage | None = None, **options: Any) -> ReplayBuffer:
    """Convert `src` into the replay buffer `out`; rerunning after an interruption finishes the job.
    `image_storage`: how camera frames are stored (default JPEG quality 95, original size)."""
    reader = open_reader(src, fmt, **options)
    buf = ReplayBuffer.open_or_create(str(out), fps=reader.fps, attrs=reader.attrs, image_storage=image_storage)
    if buf.n_episodes:  # resuming: the output must come from the same source
        theirs, ours = buf.attrs.get("provenance", {}), reader.attrs["provenance"]
        if (theirs.get("source"), theirs.get("adapter")) != (ours["source"], ours["adapter"]):
            raise DataError(out, "attrs/provenance", f"a partial conversion of {ours['source']} ({ours['adapter']})",
                            f"data from {theirs.get('source')} ({theirs.get('adapter')})")
        if buf.n_episodes > reader.n_episodes:
            raise DataError(out, "meta/episode_ends", f"at most {reader.n_episodes} episodes (the source's)", str(buf.n_episodes))
    bar = tqdm(total=reader.n_episodes, initial=buf.n_episodes, desc=f"convert {Path(src).name}", unit="ep", disable=not progress)
    for i in range(buf.n_episodes, reader.n_episodes):
        buf.append_episode(reader.read_episode(i), kinds=reader.kinds)
        bar.update(1)
    bar.close()
    reader.close()
    return buf
