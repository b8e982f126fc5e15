"""The inference worker: `policy.predict_action` off the control loop, one request in flight at a time.

A request made at step s returns a chunk whose first action belongs to step s (`chunking.py` places
it). `mode="process"` (the default, `RunnerSettings.inference`) runs the policy in a spawned process:
its Python code never holds the loop's GIL. `mode="thread"` accepts any policy object and starts
instantly, at the price of GIL sharing with the loop.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np
import torch

from protege.errors import ConfigError


def _predict(policy: Any, device: torch.device, obs: dict[str, Any], guide: Any = None) -> np.ndarray:
    with torch.no_grad():  # arrays become a batch of 1; the instruction text a list of 1 string
        batch = {k: [v] if isinstance(v, str) else torch.from_numpy(v[None]).to(device) for k, v in obs.items()}
        out = policy.predict_action(batch) if guide is None else policy.predict_action(batch, guide=guide)
        return out[0].float().cpu().numpy()


def _serve(policy: Any, device: torch.device, requests: Any, results: Any) -> None:
    """The inference loop (a thread, or the body of the inference process): requests (step, obs) ->
    results (step, chunk | None, latency s, error text | None); None ends it."""
    results.put("ready")
    while True:
        item = requests.get()
        if item is None:
            return
        step, obs, guide = item
        t0 = time.perf_counter()
        try:
            chunk = _predict(policy, device, obs, guide)
            results.put((step, chunk, time.perf_counter() - t0, None))
        except BaseException as e:  # noqa: BLE001 - reported to the control loop, which stops safely
            results.put((step, None, time.perf_counter() - t0, f"{type(e).__name__}: {e}"))


def _serve_process(policy: Any, device: torch.device, requests: Any, results: Any) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the control loop's to handle (e-stop)
    torch.set_num_threads(1)  # leave the other core to the control loop (process-wide, hence only here)
    _serve(policy, device, requests, results)


class InferenceWorker:
    """Runs `policy.predict_action` off the control loop, one request in flight at a time.

    `mode="thread"`: a thread (any policy object; its Python code shares the GIL with the loop).
    `mode="process"`: a spawned process (the policy is pickled over, tensors in shared memory):
    no GIL sharing, so a Python-heavy policy such as Diffusion Policy cannot delay a tick."""

    def __init__(self, policy: Any, device: torch.device, mode: str = "process", start_timeout: float = 120.0) -> None:
        if mode not in ("thread", "process"):
            raise ConfigError(f"runner: inference must be 'thread' or 'process', got {mode!r}")
        self.mode, self.busy = mode, False
        self.torch_threads = torch.get_num_threads()
        if mode == "thread":
            # one intra-op thread while the loop runs (restored by close()): with two, torch's worker
            # threads compete with the real-time loop for the 2 cores (measured: a 6.7 s DDIM call)
            torch.set_num_threads(1)
            self.requests, self.results = queue.Queue(), queue.Queue()
            self.worker: Any = threading.Thread(target=_serve, args=(policy, device, self.requests, self.results),
                                                name="protege-inference", daemon=True)
        else:
            import torch.multiprocessing as tmp

            ctx = tmp.get_context("spawn")
            self.requests, self.results = ctx.Queue(), ctx.Queue()
            self.worker = ctx.Process(target=_serve_process, args=(policy, device, self.requests, self.results),
                                      name="protege-inference", daemon=True)
        self.worker.start()
        try:
            ready = self.results.get(timeout=start_timeout)
        except queue.Empty:
            ready = None
        if ready != "ready":
            self.close()
            raise RuntimeError(f"the inference {mode} did not start within {start_timeout:g} s")

    def submit(self, step: int, obs: dict[str, Any], guide: Any = None) -> None:
        """`guide`: real-time chunking's constraint on this chunk (policies/guidance.py), or None."""
        self.busy = True
        self.requests.put((step, obs, guide))

    def get(self, timeout: float | None) -> tuple | None:
        """A finished result, waiting up to `timeout` s (0: poll; None: wait for it)."""
        if not self.busy:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            try:
                res = self.results.get(block=wait > 0, timeout=wait if wait > 0 else None)
                break
            except queue.Empty:
                if self.mode == "process" and not self.worker.is_alive():
                    res = (-1, None, 0.0, f"inference process died (exit code {self.worker.exitcode})")
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    return None
        self.busy = False
        return res

    def close(self) -> None:
        self.requests.put(None)
        self.worker.join(timeout=2.0)  # a policy stuck in a long call stays behind as a daemon
        torch.set_num_threads(self.torch_threads)
        if self.mode == "process" and self.worker.is_alive():
            self.worker.kill()
            self.worker.join(timeout=2.0)
