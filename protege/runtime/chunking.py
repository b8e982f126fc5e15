"""How predicted action chunks become one action per control step: chunk execution or temporal ensembling.

Both evaluation (`protege/evaluation/rollout.py`) and the real-time runner use these, one executor per
robot/env. Steps are explicit integers so a chunk that arrives late (asynchronous inference) is placed
where it belongs: `add(chunk, start)` says `chunk[0]` is the action for step `start`, and `action(step)`
returns the action for `step`, or None when no chunk covers it (the caller holds position).

- `ChunkQueue`: execute a chunk open-loop; ask for a new one when it runs out (`needs_chunk`).
- `TemporalEnsembler` (ACT, Zhao et al. 2023): query every step; the action for step t is the
  weighted mean of every stored chunk's prediction for t, weights `exp(-m * i)` with i = 0 the oldest
  prediction, so older predictions weigh more and small m averages more chunks.

How the next chunk joins the current one is the executor's `add`; when the next request goes out is
`request_lead`. A new joining rule (e.g. real-time chunking, which blends or inpaints the overlap)
is one more class with the `ActionExecutor` methods, registered in `EXECUTORS`; the runner's loop
and evaluation only call these methods and never look inside a chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class ActionExecutor(Protocol):
    def reset(self) -> None: ...

    def add(self, chunk: np.ndarray, start: int) -> None:
        """Join a predicted chunk whose first action belongs to step `start` (possibly in the past)."""

    def needs_chunk(self, step: int) -> bool:
        """True when a new chunk should be (or have been) requested for `step`."""

    def action(self, step: int) -> np.ndarray | None:
        """The action for `step`, or None when no chunk covers it (the caller holds)."""


class ChunkQueue:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.chunk: np.ndarray | None = None
        self.start = 0

    def add(self, chunk: np.ndarray, start: int) -> None:
        self.chunk, self.start = np.asarray(chunk), start

    def needs_chunk(self, step: int) -> bool:
        """True when the current chunk has no action for `step` (or there is none yet)."""
        return self.chunk is None or not self.start <= step < self.start + len(self.chunk)

    def action(self, step: int) -> np.ndarray | None:
        if self.needs_chunk(step):
            return None
        return self.chunk[step - self.start]


class TemporalEnsembler:
    def __init__(self, m: float = 0.01) -> None:
        if m < 0:
            raise ValueError(f"temporal ensembling coefficient m must be >= 0, got {m}")
        self.m = m
        self.reset()

    def reset(self) -> None:
        self.chunks: list[tuple[int, np.ndarray]] = []  # (start step, chunk), oldest first

    def add(self, chunk: np.ndarray, start: int) -> None:
        self.chunks.append((start, np.asarray(chunk)))
        self.chunks.sort(key=lambda c: c[0])  # a late chunk still counts by the step it was predicted at

    def needs_chunk(self, step: int) -> bool:
        return True  # query every step

    def action(self, step: int) -> np.ndarray | None:
        # chunks that end before `step` can never contribute again
        self.chunks = [(s, c) for s, c in self.chunks if s + len(c) > step]
        preds = [c[step - s] for s, c in self.chunks if s <= step]
        if not preds:
            return None
        w = np.exp(-self.m * np.arange(len(preds)))
        return (np.tensordot(w, np.stack(preds), axes=1) / w.sum()).astype(preds[0].dtype)


# the one registry of joining rules: name -> factory(**options)
EXECUTORS: dict[str, Callable[..., ActionExecutor]] = {"chunks": ChunkQueue, "temporal_ensemble": TemporalEnsembler}


def make_executor(temporal_ensemble: float | None) -> ActionExecutor:
    """`temporal_ensemble=None` -> chunk execution; a number m -> temporal ensembling with that m."""
    if temporal_ensemble is None:
        return EXECUTORS["chunks"]()
    return EXECUTORS["temporal_ensemble"](m=float(temporal_ensemble))


def request_lead(latencies: Sequence[float], period: float, budget: float) -> int:
    """How many steps before the current chunk runs out the next request goes out, from the measured
    latency (the worst of the last 10 calls): 0 when inference fits in `budget` of a period (the
    loop then waits for it inside the tick, equivalent to synchronous evaluation), else
    ceil(latency / period) + 1 (one period of margin: latency varies from call to call)."""
    lat = max(latencies[-10:], default=0.0)
    return 0 if lat <= budget * period else math.ceil(lat / period) + 1
