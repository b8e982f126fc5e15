"""Recording of a run (or a teleop session): every executed step of an episode, appended to a replay
buffer (`protege run`: `<out_dir>/recording.zarr`) when the episode ends, also the partial episode of
a failed run.

Steps are kept in memory during the episode (a list append per key on the loop thread) and written
in one append at its end, so no storage I/O happens inside a tick; `append_episode` commits the
episode atomically (data first, then `meta/episode_ends`), so a crash keeps every finished episode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Recorder:
    def __init__(self, path: Path | None, fps: float, attrs: dict[str, Any], enabled: bool = True,
                 image_storage: Any = None) -> None:
        self.file, self.fps, self.attrs, self.enabled = path, fps, attrs, enabled and path is not None
        self.image_storage = image_storage  # frames.ImageStorage: codec + resize of recorded camera frames
        self.buffer: Any = None
        self.rows: dict[str, list] = {}

    @property
    def path(self) -> str | None:
        """The recording, once something was written."""
        return str(self.file) if self.buffer is not None else None

    def add(self, row: dict[str, Any]) -> None:
        """One executed step: key -> value (the same keys every step)."""
        if self.enabled:
            for k, v in row.items():
                self.rows.setdefault(k, []).append(np.asarray(v))

    def end_episode(self) -> None:
        rows, self.rows = self.rows, {}
        if not rows or not self.enabled:
            return
        from protege.datasets.replay_buffer import ReplayBuffer

        if self.buffer is None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            self.buffer = ReplayBuffer.open_or_create(str(self.file), fps=self.fps, attrs=self.attrs,
                                                      image_storage=self.image_storage)
        self.buffer.append_episode({k: np.stack(v) for k, v in rows.items()})
