"""Recording of a run: every executed step of an episode, appended to `<out_dir>/recording.zarr`
(a replay buffer) when the episode ends, also the partial episode of a failed run.

Steps are kept in memory during the episode (a list append per key on the loop thread) and written
in one append at its end, so no storage I/O happens inside a tick; `append_episode` commits the
episode atomically (data first, then `meta/episode_ends`), so a crash keeps every finished episode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Recorder:
    def __init__(self, out_dir: Path | None, fps: float, attrs: dict[str, Any], enabled: bool = True,
                 image_storage: Any = None) -> None:
        self.out_dir, self.fps, self.attrs, self.enabled = out_dir, fps, attrs, enabled and out_dir is not None
        self.image_storage = image_storage  # frames.ImageStorage: codec + resize of recorded camera frames
        self.buffer: Any = None
        self.rows: dict[str, list] = {}

    @property
    def path(self) -> str | None:
        """The recording, once something was written."""
        return str(self.out_dir / "recording.zarr") if self.buffer is not None else None

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
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.buffer = ReplayBuffer.open_or_create(str(self.out_dir / "recording.zarr"), fps=self.fps, attrs=self.attrs,
                                                      image_storage=self.image_storage)
        self.buffer.append_episode({k: np.stack(v) for k, v in rows.items()})
