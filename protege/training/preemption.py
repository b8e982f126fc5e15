"""Preemption-safe training: SIGINT / SIGTERM (Ctrl-C, SLURM, cloud preemption) ask the trainer to
stop after the current step and checkpoint; a second signal stops at once.

The handler only records the signal: the training loop polls `StopSignal.signum` between steps, so a
step is never cut in half and the checkpoint is an ordinary one (exact resume). With several ranks
`agree_on_stop` makes them all stop after the same step (any rank's signal counts), because the
checkpoint gathers state from every rank.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    """Installs the handlers (main thread only; elsewhere it stays inert; ignored signals stay
    ignored) until `restore()`."""

    def __init__(self) -> None:
        self.signum = 0
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # e.g. SIGINT under `nohup ... &`: stays ignored
                    self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # a forked DataLoader worker (worker_start=fork; Ctrl-C reaches the whole process group): the training
            # process decides, and torch stops its workers when it exits
            return
        if self.signum:  # the second signal: leave now, without a checkpoint
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\nprotege train: {signal.Signals(signum).name} received: finishing this step and saving a "
              "checkpoint (signal again to stop at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def agree_on_stop(signum: int, world: int, device: torch.device | None = None) -> int:
    """The signal number any rank received (0: none); a collective when `world > 1` (`device`: the
    rank's device, since NCCL reduces CUDA tensors only)."""
    if world == 1:
        return signum
    flag = torch.tensor([signum], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())
