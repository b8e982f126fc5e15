"""How predicted action chunks become one action per control step: chunk switching, temporal
ensembling or real-time chunking (`runner.chunk_join` / `eval.chunk_join`: switch | ensemble | rtc).

Both evaluation (`protege/evaluation/rollout.py`) and the real-time runner use these, one executor per
robot/env. Steps are explicit integers so a chunk that arrives late (asynchronous inference) is placed
where it belongs: `add(chunk, start)` says `chunk[0]` is the action for step `start`, and `action(step)`
returns the action for `step`, or None when no chunk covers it (the caller holds position).

- `ChunkQueue` (switch): execute a chunk open-loop; ask for a new one (`wants_chunk`) when it runs
  out, or after `execute_steps` of it; a new chunk replaces the old one from its first fresh step on.
- `TemporalEnsembler` (ACT, Zhao et al. 2023): query every step; the action for step t is the
  weighted mean of every stored chunk's prediction for t, weights `exp(-m * i)` with i = 0 the oldest
  prediction, so older predictions weigh more and small m averages more chunks.
- `RealTimeChunker` (rtc, Black, Galliker & Levine 2025): a `ChunkQueue` whose requests carry a
  `ChunkGuide` (`guide(start, delay)`): the current chunk's actions from the request step on, the
  first `delay` (executed while the policy thinks) frozen, the rest of the overlap softly weighted, so
  the policy inpaints the next chunk onto the current one (`policies/guidance.py`) and the join is smooth.

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

from protege.policies.guidance import ChunkGuide, soft_mask


class ActionExecutor(Protocol):
    def reset(self) -> None: ...

    def add(self, chunk: np.ndarray, start: int) -> None:
        """Join a predicted chunk whose first action belongs to step `start` (possibly in the past)."""

    def needs_chunk(self, step: int) -> bool:
        """True when no chunk has an action for `step` (the caller waits for one, or holds)."""

    def wants_chunk(self, step: int) -> bool:
        """True when the next chunk should be requested for `step`."""

    def guide(self, start: int, delay: int) -> ChunkGuide | None:
        """What a chunk requested at `start`, arriving `delay` steps later, should agree with (rtc)."""

    def action(self, step: int) -> np.ndarray | None:
        """The action for `step`, or None when no chunk covers it (the caller holds)."""


class ChunkQueue:
    def __init__(self, execute_steps: int | None = None) -> None:
        """`execute_steps`: ask for the next chunk after this many steps of the current one (the
        rest stays executable until it arrives); default: when it runs out."""
        self.execute_steps = execute_steps
        self.reset()

    def reset(self) -> None:
        self.chunk: np.ndarray | None = None
        self.start = 0

    def add(self, chunk: np.ndarray, start: int) -> None:
        self.chunk, self.start = np.asarray(chunk), start

    def needs_chunk(self, step: int) -> bool:
        """True when the current chunk has no action for `step` (or there is none yet)."""
        return self.chunk is None or not self.start <= step < self.start + len(self.chunk)

    def wants_chunk(self, step: int) -> bool:
        n = len(self.chunk) if self.chunk is not None else 0
        return self.needs_chunk(step) or step >= self.start + min(n, self.execute_steps or n)

    def guide(self, start: int, delay: int) -> ChunkGuide | None:
        return None  # switching: every chunk is sampled on its own

    def action(self, step: int) -> np.ndarray | None:
        if self.needs_chunk(step):
            return None
        return self.chunk[step - self.start]


class RealTimeChunker(ChunkQueue):
    def __init__(self, execute_steps: int | None = None, max_weight: float = 5.0) -> None:
        super().__init__(execute_steps)
        self.max_weight = max_weight

    def guide(self, start: int, delay: int) -> ChunkGuide | None:
        """The current chunk's actions from `start` on, the first `delay` frozen."""
        if self.chunk is None or not self.start <= start < self.start + len(self.chunk):
            return None
        remaining = self.chunk[start - self.start :]
        frozen = min(max(delay, 0), len(remaining))
        return ChunkGuide(remaining, soft_mask(len(remaining), frozen), frozen, self.max_weight)


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
        return not any(s <= step < s + len(c) for s, c in self.chunks)

    def wants_chunk(self, step: int) -> bool:
        return True  # query every step (whenever no request is in flight)

    def guide(self, start: int, delay: int) -> ChunkGuide | None:
        return None

    def action(self, step: int) -> np.ndarray | None:
        # chunks that end before `step` can never contribute again
        self.chunks = [(s, c) for s, c in self.chunks if s + len(c) > step]
        preds = [c[step - s] for s, c in self.chunks if s <= step]
        if not preds:
            return None
        w = np.exp(-self.m * np.arange(len(preds)))
        return (np.tensordot(w, np.stack(preds), axes=1) / w.sum()).astype(preds[0].dtype)


# the one registry of joining rules: name -> factory(**options)
EXECUTORS: dict[str, Callable[..., ActionExecutor]] = {"switch": ChunkQueue, "ensemble": TemporalEnsembler,
                                                      "rtc": RealTimeChunker}


def make_executor(temporal_ensemble: float | None, chunk_join: str | None = None,
                  execute_steps: int | None = None) -> ActionExecutor:
    """`chunk_join`: switch | ensemble | rtc; None: from `temporal_ensemble` (None -> switch, a number
    m -> ensembling with that m; `ensemble` without m uses ACT's 0.01). `execute_steps`: see ChunkQueue."""
    if chunk_join is None:
        chunk_join = "switch" if temporal_ensemble is None else "ensemble"
    if chunk_join not in EXECUTORS:
        raise ValueError(f"chunk_join={chunk_join!r}: expected one of {sorted(EXECUTORS)}")
    if chunk_join == "ensemble":
        return EXECUTORS["ensemble"](m=0.01 if temporal_ensemble is None else float(temporal_ensemble))
    return EXECUTORS[chunk_join](execute_steps=execute_steps)


def request_lead(latencies: Sequence[float], period: float, budget: float) -> int:
    """How many steps before the current chunk runs out the next request goes out, from the measured
    latency (the worst of the last 10 calls): 0 when inference fits in `budget` of a period (the
    loop then waits for it inside the tick, equivalent to synchronous evaluation), else
    ceil(latency / period) + 1 (one period of margin: latency varies from call to call)."""
    lat = max(latencies[-10:], default=0.0)
    return 0 if lat <= budget * period else math.ceil(lat / period) + 1
