"""Training data: one index stream, two ways to turn it into batches.

`WindowIndexStream` decides which windows every training step uses. The stream is a concatenation
of per-epoch permutations of the windows, each drawn from a generator seeded by (seed, epoch);
step `s` of rank `r` takes the slice `[p + r*B, p + (r+1)*B)` of it, where `p` is the stream
position (windows consumed by all ranks before the step). So the windows of a step are a function
of (seed, position) only: resuming needs just the position (saved in `train_state.pt`), the
stream is the same whatever the number of DataLoader workers, and the ranks of a step read
disjoint windows (DistributedSampler's contract, without its epoch bookkeeping).

Batches then come either from an in-memory copy of the buffer (`ReplayBuffer.load`, gathered in
the training process: fastest while it fits) or, when it does not fit `train.data.memory_budget_gb`,
from the store itself: a torch DataLoader whose worker processes read and decode whole batches of
windows (`WindowDataset.__getitems__`) straight from zarr while the training step runs.

The workers start by `forkserver` (`train.data.worker_start`): forked from a small server process
instead of the training process, they do not inherit its pages (model, optimizer state, modules
the trainer imported), which summed RSS would count once more per worker, and starting them stays
safe once CUDA is initialised. The dataset reaches them pickled (zarr arrays reopen their store).
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from protege.datasets.replay_buffer import ReplayBuffer
from protege.datasets.sampler import SequenceSampler, WindowDataset, to_torch
from protege.errors import ConfigError


class WindowIndexStream:
    """Infinite stream of index batches for one rank (see the module docstring)."""

    def __init__(self, n_windows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 position: int = 0) -> None:
        if n_windows < 1:
            raise ValueError(f"no windows to sample (n_windows={n_windows})")
        self.n_windows, self.batch_size, self.seed = n_windows, batch_size, seed
        self.rank, self.world = rank, world
        self.position = position  # windows consumed (by all ranks) before the next batch
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    @property
    def epoch_length(self) -> int:
        """Windows used per epoch: whole global batches (the permutation's last `n % G` windows
        wait for another epoch), so a step never spans two permutations and its windows are
        distinct; with fewer windows than a global batch, all of them (repeats are unavoidable)."""
        g = self.global_batch
        return self.n_windows // g * g if self.n_windows >= g else self.n_windows

    def indices_at(self, position: int) -> np.ndarray:
        """This rank's window indices of the step that starts at stream `position`."""
        pos = position + self.rank * self.batch_size + np.arange(self.batch_size)
        epochs, within = np.divmod(pos, self.epoch_length)
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):  # at most a few epochs when a batch wraps around
            sel = epochs == e
            out[sel] = self._epoch_perm(int(e))[within[sel]]
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yields from the current position on; `position` advances as batches are drawn. The
        trainer saves its own count of consumed batches, not this (a DataLoader draws ahead)."""
        while True:
            idx = self.indices_at(self.position)
            self.position += self.global_batch
            yield idx


def decoded_nbytes(buffer: ReplayBuffer, keys: list[str]) -> int:
    """Bytes the committed steps of `keys` take once decoded into numpy."""
    return sum(buffer.n_steps * int(np.prod(buffer[k].shape[1:])) * np.dtype(buffer[k].dtype).itemsize for k in keys)


def use_in_memory(setting: Any, nbytes: int, budget_gb: float) -> bool:
    """`train.data.in_memory`: true / false, or auto = in memory when the decoded size fits the budget."""
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    if setting == "auto":
        return nbytes <= budget_gb * 2**30
    raise ConfigError(f"train.data.in_memory: expected auto, true or false, found {setting!r}")


class StoreRows:
    """Rows of one key read from the store on demand: `rows[int_array]` is `ReplayBuffer.read`
    (only the chunks holding those steps, each frame decoded once even when windows overlap), so
    the sampler's vectorised gather indexes it like a numpy array."""

    def __init__(self, buffer: ReplayBuffer, key: str) -> None:
        self.buffer, self.key = buffer, key
        self.shape, self.dtype = tuple(buffer[key].shape), buffer[key].dtype

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return self.buffer.read(self.key, idx)


def open_streaming(path: Any, keys: list[str]) -> ReplayBuffer:
    """A buffer whose image keys stay in the store (read per batch) and whose other keys
    (state, action, language: small) are read into memory once."""
    src = ReplayBuffer.open(path, "r")
    n = src.n_steps
    data = {k: StoreRows(src, k) if src.kinds.get(k) == "image" else src.read(k, slice(0, n)) for k in keys}
    return ReplayBuffer(data, src.episode_ends.copy(), src.attrs, group=None, path=src.path)


def load_buffer(path: Any, keys: list[str], in_memory: Any = "auto", budget_gb: float = 8.0) -> tuple[ReplayBuffer, bool]:
    """The training buffer: an in-memory copy, or a streaming view (returns it and whether it is in memory)."""
    src = ReplayBuffer.open(path, "r")
    for k in keys:
        src[k]  # a missing key is a DataError naming it
    if use_in_memory(in_memory, decoded_nbytes(src, keys), budget_gb):
        return ReplayBuffer.load(src, keys=keys), True
    return open_streaming(path, keys), False


WORKER_STARTS = ("forkserver", "spawn", "fork")


def worker_context(start: str, store_path: str) -> multiprocessing.context.BaseContext:
    """The multiprocessing context of the DataLoader workers (`train.data.worker_start`)."""
    if start not in WORKER_STARTS:
        raise ConfigError(f"train.data.worker_start: expected one of {list(WORKER_STARTS)}, found {start!r}")
    if store_path.startswith("memory://"):
        # fsspec's memory filesystem lives in this process: only forked workers see its files
        start = "fork"
    return multiprocessing.get_context(start)


def _ignore_stop_signals(worker_id: int) -> None:
    """Worker init: Ctrl-C / SIGTERM sent to the whole process group are the training process's to
    handle (finish the step, checkpoint; see preemption.py). A worker that died of them would fail
    that last step; forked workers get the same from the trainer's inherited handler."""
    for s in (signal.SIGINT, signal.SIGTERM):  # preemption.SIGNALS (datasets does not import training)
        signal.signal(s, signal.SIG_IGN)


def batch_iterator(sampler: SequenceSampler, stream: WindowIndexStream, streaming: bool, num_workers: int = 2,
                   prefetch_factor: int = 4, pin_memory: bool = False,
                   worker_start: str = "forkserver") -> Iterator[dict[str, torch.Tensor]]:
    """Batches in the order of `stream`. In memory: gathered here. Streaming: a DataLoader whose
    workers gather (read + decode) whole batches; it returns them in sampler order, so the batch
    sequence does not depend on `num_workers`. `worker_start`: see the module docstring."""
    if not streaming:
        return (to_torch(sampler.gather(idx)) for idx in stream)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        context = worker_context(worker_start, sampler.buffer.path)
        kwargs = dict(persistent_workers=True, prefetch_factor=prefetch_factor, multiprocessing_context=context,
                      worker_init_fn=None if context.get_start_method() == "fork" else _ignore_stop_signals)
    loader = torch.utils.data.DataLoader(WindowDataset(sampler), batch_sampler=stream, num_workers=num_workers,
                                         collate_fn=WindowDataset.collate, pin_memory=pin_memory, **kwargs)
    return iter(loader)
