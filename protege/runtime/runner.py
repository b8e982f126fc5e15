"""The real-time runner: a trained policy drives a `Robot` at a fixed rate.

Each tick (monotonic clock, `period = 1 / rate_hz`): read the robot, update the observation history
(`n_obs_steps`), collect a finished inference, start the next one, take this step's action from the
chunk executor (`chunking.py`: chunk execution or temporal ensembling, explicit step indices), turn
it into a safe joint command (`Controller`: action space, IK, safety) and send it, record the step.

Inference runs off the loop (a thread or a process), so the loop never waits for the policy. A request made at step s
returns a chunk whose first action belongs to step s; by the time it arrives the steps already
passed are dropped (counted as stale). The next request is started `lead` steps before the current
chunk runs out, `lead` from the measured latency (the worst of the last 10 calls): 0 when inference
fits in `inference_budget` of a period (the loop then waits for it inside the tick, which is
equivalent to synchronous evaluation), else ceil(latency / period) + 1. Inference runs in a spawned
process by default (`inference=process`), so the policy's Python code never holds the loop's GIL,
and the loop thread asks for SCHED_FIFO priority (`rt_priority`) so other processes cannot delay it. With a simulated clock (`robot.clock.realtime` False) the loop always
waits for inference: simulated time stands still meanwhile.

When no action is available (policy late, action rejected by the safety layer, camera frame
missing) the robot holds its last command; the `Watchdog` stops the run after `watchdog_timeout` s
without a fresh action. Ctrl-C / SIGTERM / `EStop.trigger` end the run; every ending goes through
`robot.stop()`. Every executed step is recorded to a replay buffer (one episode per run episode,
also the partial episode of a failed run), and timing statistics are printed and saved as JSON.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protege.errors import ConfigError
from protege.hardware.base import (Controller, EStop, Observation, RobotError, SafetyLayer, Watchdog,
                                   make_action_space, policy_observation)
from protege.runtime.chunking import make_executor

log = logging.getLogger("protege.runtime")

# exit codes of `protege run`, by how the run ended
EXIT_CODES = {"completed": 0, "policy_error": 1, "watchdog": 3, "robot_error": 4, "estop": 5, "SIGINT": 130, "SIGTERM": 143}


@dataclass
class RunnerSettings:
    rate_hz: float | None = None  # default: the task's fps
    n_episodes: int = 1
    max_steps: int | None = None  # per episode; default: the task's max_episode_steps
    temporal_ensemble: float | None | str = "policy"  # "policy": the policy's attribute; None: chunks; m: ensembling
    chunk_join: str | None = None  # switch | ensemble | rtc (real-time chunking); None: from temporal_ensemble
    execute_steps: int | None = None  # request the next chunk after this many steps of the current one (None: when it runs out)
    inference_budget: float = 0.5  # fraction of a period the loop may wait for inference inside a tick
    watchdog_timeout: float = 1.0  # s without a fresh action -> stop
    seed: int = 100_000  # episode k resets the (simulated) scene with seed + k, as `protege eval` does
    stop_on_success: bool = True
    record: bool = True
    out_dir: str | None = None
    inference: str = "thread"  # thread | process (see InferenceWorker)
    instruction: str | None = None  # the text a language-conditioned policy (VLA) is given every step
    rt_priority: int = 50  # SCHED_FIFO priority of the control loop thread (Linux; 0: off; needs root or CAP_SYS_NICE)


def _realtime_priority(priority: int) -> tuple | None:
    """Run the calling thread (the control loop) under SCHED_FIFO so other processes cannot delay a
    tick; the inference thread, started before, keeps normal priority. Returns what to restore."""
    if priority <= 0 or not hasattr(os, "sched_setscheduler"):
        return None
    old = (os.sched_getscheduler(0), os.sched_getparam(0))
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as e:
        log.warning("runner: no real-time priority for the control loop (%s); timing will suffer on a loaded machine", e)
        return None
    return old


class _Stop(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _predict(policy: Any, device: torch.device, obs: dict[str, Any], guide: Any = None) -> np.ndarray:
    with torch.no_grad():  # arrays become a batch of 1; the instruction text a list of 1 string
        batch = {k: [v] if isinstance(v, str) else torch.from_numpy(v[None]).to(device) for k, v in obs.items()}
        out = policy.predict_action(batch) if guide is None else policy.predict_action(batch, guide=guide)
        return out[0].float().cpu().numpy()


def _serve(policy: Any, device: torch.device, requests: Any, results: Any) -> None:
    """The inference loop (a thread, or the body of the inference process): requests (step, obs) ->
    results (step, chunk | None, latency s, error text | None); None ends it. A request may carry a
    real-time-chunking guide (step, obs, guide)."""
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

    def __init__(self, policy: Any, device: torch.device, mode: str = "thread", start_timeout: float = 120.0) -> None:
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

    def submit(self, step: int, obs: dict[str, np.ndarray], guide: Any = None) -> None:
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


class Runner:
    def __init__(
        self,
        policy: Any,
        robot: Any,
        action_space: str,
        state_keys: list[str],
        cameras: list[str] | None = None,
        task: Any = None,
        settings: RunnerSettings | None = None,
        device: str | torch.device = "cpu",
        estop: EStop | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        self.policy, self.robot, self.task = policy, robot, task
        self.s = settings or RunnerSettings()
        self.policy_keys = list(policy.obs_keys)
        meta = getattr(policy, "shape_meta", {})
        self.language_keys = [k for k in self.policy_keys if meta.get(k, {}).get("kind") == "language"]
        if self.language_keys and not self.s.instruction:
            tasks = meta[self.language_keys[0]].get("tasks", [])
            raise ConfigError(f"runner: the policy is language-conditioned ({self.language_keys[0]!r}); set runner.instruction "
                              f"to the text to follow (it was trained on {tasks})")
        self.state_keys, self.cameras = list(state_keys), list(cameras or [])
        self.device = torch.device(device)
        self.estop = estop or EStop()
        self.provenance = provenance or {}
        rate = self.s.rate_hz
        if not rate or rate <= 0:
            raise ConfigError(f"runner: rate_hz must be a positive number, got {rate}")
        self.period = 1.0 / float(rate)
        te = self.s.temporal_ensemble
        self.temporal_ensemble = getattr(policy, "temporal_ensemble", None) if te == "policy" else te
        if self.s.chunk_join == "rtc" and not getattr(policy, "supports_guide", False):
            raise ConfigError(f"runner.chunk_join=rtc needs a diffusion or flow policy (guided sampling); "
                              f"{type(policy).__name__} has none")
        self.action_space = make_action_space(action_space)
        self.safety = SafetyLayer(robot.limits, self.period)
        self.max_steps = self.s.max_steps or (task.max_episode_steps if task is not None else None)
        if not self.max_steps:
            raise ConfigError("runner: max_steps is required when no task defines an episode length")
        self.out_dir = Path(self.s.out_dir) if self.s.out_dir else None

    # ------------------------------------------------------------------------------------ helpers
    def _observe(self, obs: Observation) -> dict[str, np.ndarray] | None:
        return policy_observation(obs, self.state_keys, self.cameras)

    def _window(self, history: deque) -> dict[str, Any]:
        out: dict[str, Any] = {"instruction": self.s.instruction} if self.language_keys else {}
        for key in self.policy_keys:
            if key in self.language_keys:
                continue
            name = key.removeprefix("obs/")
            if name not in history[-1]:
                raise ConfigError(f"policy observation key {key!r} is not produced by the robot/task "
                                  f"(available: {['obs/' + k for k in history[-1]]})")
            out[key] = np.stack([h[name] for h in history])
        return out

    # --------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        self.stats: dict[str, Any] = {"wake": [], "scheduled": [], "periods": [], "latency": [], "ticks": 0, "deadline_misses": 0,
                                      "overruns": 0, "stale_actions_dropped": 0, "missing_frames": 0,
                                      "first_latency": []}
        self.episodes: list[dict[str, Any]] = []
        self.buffer = None
        status, message = "completed", f"{self.s.n_episodes} episode(s) completed"
        self.policy.eval()
        worker = InferenceWorker(self.policy, self.device, self.s.inference)
        # the loop thread must get the GIL back quickly when it wakes; the default 5 ms switch
        # interval would let the inference thread's Python code delay a tick by up to 5 ms
        switch = sys.getswitchinterval()
        sys.setswitchinterval(2e-4)
        old_sched = _realtime_priority(self.s.rt_priority) if self.robot.clock.realtime else None
        try:
            with self.estop.signals():
                try:
                    self.robot.connect()
                    log.info("runner: %s connected; %d episode(s) at %g Hz; Ctrl-C stops the robot",
                             self.robot.name, self.s.n_episodes, 1.0 / self.period)
                    for ep in range(self.s.n_episodes):
                        self._episode(ep, worker)
                except _Stop as e:
                    status, message = e.status, e.message
                except RobotError as e:
                    status, message = "robot_error", f"robot error: {e}"
                except KeyboardInterrupt:
                    status, message = "SIGINT", "interrupted (second Ctrl-C)"
        finally:
            sys.setswitchinterval(switch)
            if old_sched is not None:
                os.sched_setscheduler(0, *old_sched)
            worker.close()
            stop_error = self._safe_stop()
            if stop_error and status == "completed":
                status, message = "robot_error", stop_error
        report = self._report(status, message)
        log.info("runner: %s", message)
        return report

    def _safe_stop(self) -> str | None:
        try:
            self.robot.stop()
            return None
        except Exception as e:  # noqa: BLE001 - the robot may already be gone (connection lost)
            log.error("robot.stop() failed: %s", e)
            return f"robot.stop() failed: {e}"

    def _episode(self, ep: int, worker: InferenceWorker) -> None:
        robot, clock, realtime = self.robot, self.robot.clock, self.robot.clock.realtime
        if self.task is not None and hasattr(robot, "reset_scene"):
            self.task.reset(robot, np.random.default_rng(self.s.seed + ep))
        controller = Controller(robot.kinematics, self.action_space, self.safety)
        controller.reset()
        executor = make_executor(self.temporal_ensemble, self.s.chunk_join, self.s.execute_steps)
        self.policy.reset()
        rec: dict[str, list] = {}
        result = {"episode": ep, "seed": self.s.seed + ep, "success": False, "length": 0}
        self.episodes.append(result)
        try:
            obs = robot.read()
            pobs = self._observe(obs)
            if pobs is None:
                raise _Stop("robot_error", f"camera frame missing at the start of episode {ep}; not starting")
            history: deque = deque([pobs] * self.policy.n_obs_steps, maxlen=self.policy.n_obs_steps)
            if worker.busy:  # a request of the previous episode still in flight: its chunk belongs to that scene
                worker.get(None)
            # first chunk synchronously (also warms the policy up): the loop starts with an action. Its
            # latency (lazy init, caches) is kept out of the stats that set the request lead time.
            worker.submit(0, self._window(history))
            self._add(worker.get(None), executor, 0, first=True)
            watchdog = Watchdog(self.period, self.s.watchdog_timeout)
            last_good, hold_reason = pobs, ""
            t_next = clock.now()
            prev_wake = None
            for step in range(self.max_steps + 1):
                clock.sleep_until(t_next)
                now = clock.now()
                if prev_wake is not None:  # periods within an episode (not across scene resets)
                    self.stats["periods"].append(now - prev_wake)
                prev_wake = now
                self.stats["wake"].append(now)
                self.stats["scheduled"].append(t_next)
                if self.estop.triggered:
                    reason = self.estop.reason or "e-stop"
                    raise _Stop(reason if reason in EXIT_CODES else "estop", f"stopped by {reason} at step {step} of episode {ep}")
                obs = robot.read()
                if self.task is not None and self.task.success(obs):
                    result["success"] = True
                    if self.s.stop_on_success:
                        break
                if step == self.max_steps:
                    break
                pobs = self._observe(obs)
                if pobs is None:
                    self.stats["missing_frames"] += 1
                    self.safety.intervene("missing_camera_frame", f"step {step}: a camera delivered no frame, holding")
                    hold_reason = "camera frames missing"
                else:
                    history.append(pobs)
                    last_good = pobs
                # inference: collect, then request the next chunk early enough for the measured latency
                self._add(worker.get(0), executor, step)
                lead = self._lead() if realtime else 0
                if pobs is not None and not worker.busy and executor.wants_chunk(step + lead):
                    # rtc: the `lead` actions run before the chunk can arrive are frozen in it
                    worker.submit(step, self._window(history), executor.guide(step, lead))
                if worker.busy and executor.needs_chunk(step):
                    wait = None if not realtime else max(0.0, t_next + self.s.inference_budget * self.period - clock.now())
                    self._add(worker.get(wait), executor, step)
                action = executor.action(step)
                fresh = False
                if action is not None:
                    cmd, fresh = controller(action, obs)
                    if not fresh:
                        hold_reason = "actions rejected by the safety layer (" + ", ".join(
                            k for k in self.safety.counts if k != "missing_camera_frame") + ")"
                else:
                    cmd = controller.hold(obs)
                    if pobs is not None:
                        self.stats["deadline_misses"] += 1
                        hold_reason = f"the policy missed its deadline (latency {self._latency_ms():.0f} ms, period {self.period * 1e3:.0f} ms)"
                if fresh:
                    watchdog.feed(now)
                elif watchdog.state(now) == "expired":
                    raise _Stop("watchdog", f"watchdog: no valid action for {self.s.watchdog_timeout:g} s at step {step} "
                                f"of episode {ep}: {hold_reason}; robot stopped")
                robot.command(cmd)
                executed = np.asarray(action, np.float32) if fresh else self.action_space.hold_action(obs, cmd)
                self._record(rec, obs, last_good, executed, cmd, held=not fresh)
                result["length"] = step + 1
                self.stats["ticks"] += 1
                t_next += self.period
                if realtime and clock.now() > t_next:
                    self.stats["overruns"] += 1
                    t_next = clock.now()  # do not try to catch up with a burst of late ticks
        finally:
            self._flush(rec)

    def _add(self, res: tuple | None, executor: Any, step: int, first: bool = False) -> None:
        if res is None:
            return
        start, chunk, latency, error = res
        self.stats["first_latency" if first else "latency"].append(latency)
        if error is not None:
            raise _Stop("policy_error", f"policy raised {error} (at step {step}); robot stopped")
        executor.add(chunk, start)
        self.stats["stale_actions_dropped"] += min(len(chunk), max(0, step - start))

    def _latency_ms(self) -> float:
        lat = self.stats["latency"][-10:]
        return 1e3 * float(np.max(lat)) if lat else 0.0

    def _lead(self) -> int:
        lat = self._latency_ms() / 1e3
        # one period of margin: latency varies from call to call
        return 0 if lat <= self.s.inference_budget * self.period else math.ceil(lat / self.period) + 1

    # ------------------------------------------------------------------------------- recording
    def _record(self, rec: dict[str, list], obs: Observation, pobs: dict[str, np.ndarray], action: np.ndarray,
                cmd: Any, held: bool) -> None:
        if not self.s.record:
            return
        row = {f"obs/{k}": v for k, v in pobs.items()}
        row["obs/state"] = policy_observation(obs, self.state_keys, [])["state"]  # this tick's state even if a frame is missing
        row.update({"action": action, "robot/t": np.float64(obs.t), "robot/joint_pos": obs.joint_pos,
                    "robot/joint_vel": obs.joint_vel, "robot/ee_pos": obs.ee_pos, "robot/gripper": obs.gripper,
                    "command/q": cmd.q, "command/gripper": np.float32(cmd.gripper), "runner/held": np.uint8(held)})
        if self.language_keys:  # the recording is a language-labelled demo: task 0 = the instruction (attrs["tasks"])
            row["task"] = np.int64(0)
        for k, v in row.items():
            rec.setdefault(k, []).append(np.asarray(v))

    def _flush(self, rec: dict[str, list]) -> None:
        if not rec or self.out_dir is None:
            return
        from protege.datasets.replay_buffer import ReplayBuffer

        if self.buffer is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.buffer = ReplayBuffer.open_or_create(
                str(self.out_dir / "recording.zarr"), fps=1.0 / self.period,
                attrs={"provenance": {"source": "protege run", "robot": self.robot.name, **self.provenance},
                       "units": {"action": self.action_space.name},
                       **({"tasks": [self.s.instruction]} if self.language_keys else {})})
        self.buffer.append_episode({k: np.stack(v) for k, v in rec.items()})

    # ---------------------------------------------------------------------------------- report
    def _report(self, status: str, message: str) -> dict[str, Any]:
        st = self.stats
        wake, sched = np.array(st["wake"]), np.array(st["scheduled"])
        realtime = self.robot.clock.realtime
        ms = lambda x, q: float(np.percentile(x, q) * 1e3) if len(x) else None  # noqa: E731
        periods = np.array(st["periods"]) if realtime else np.array([])
        jitter = np.abs(wake - sched) if realtime else np.array([])
        lat = np.array(st["latency"])
        ticks = st["ticks"]
        succ = [e["success"] for e in self.episodes]
        report = {
            "status": status, "exit_code": EXIT_CODES.get(status, 1), "message": message,
            "robot": self.robot.name, "realtime": realtime, "rate_hz": 1.0 / self.period,
            "temporal_ensemble": self.temporal_ensemble, "chunk_join": self.s.chunk_join,
            "episodes": self.episodes,
            "success_rate": float(np.mean(succ)) if succ and self.task is not None else None,
            "ticks": ticks,
            "period_ms_p50": ms(periods, 50), "period_ms_p99": ms(periods, 99),
            "jitter_ms_p50": ms(jitter, 50), "jitter_ms_p99": ms(jitter, 99),
            "jitter_ms_max": float(jitter.max() * 1e3) if len(jitter) else None,
            "inference_ms_median": ms(lat, 50), "inference_ms_p99": ms(lat, 99), "n_inferences": int(len(lat)),
            "first_chunk_ms_max": float(np.max(st["first_latency"]) * 1e3) if st["first_latency"] else None,
            "deadline_misses": st["deadline_misses"], "overruns": st["overruns"],
            "deadline_miss_rate": (st["deadline_misses"] + st["overruns"]) / ticks if ticks else 0.0,
            "stale_actions_dropped": st["stale_actions_dropped"],
            "safety_interventions": dict(self.safety.counts),
            "recording": str(self.out_dir / "recording.zarr") if self.buffer is not None else None,
        }
        if hasattr(self.robot, "diagnostics"):  # e.g. the Franka's 1 kHz loop: cycles, gaps, errors
            report["robot_diagnostics"] = self.robot.diagnostics()
        if self.out_dir is not None:
            from protege.evaluation.rollout import write_json

            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.out_dir / "runner.json", report)
            report["json"] = str(self.out_dir / "runner.json")
        return report


def format_report(r: dict[str, Any]) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        f"run: {r['status']} (exit {r['exit_code']}): {r['message']}",
        f"  robot {r['robot']} at {r['rate_hz']:g} Hz ({'real time' if r['realtime'] else 'simulated time'}), "
        f"{r['ticks']} ticks, {len(r['episodes'])} episode(s), success_rate {f(r['success_rate'])}",
        f"  loop period p50/p99 {f(r['period_ms_p50'])}/{f(r['period_ms_p99'])} ms, jitter p99 {f(r['jitter_ms_p99'])} ms "
        f"(max {f(r['jitter_ms_max'])})",
        f"  inference median/p99 {f(r['inference_ms_median'])}/{f(r['inference_ms_p99'])} ms over {r['n_inferences']} calls "
        f"(+ each episode's first chunk, max {f(r['first_chunk_ms_max'])} ms); "
        f"deadline misses {r['deadline_misses']}, overruns {r['overruns']} (rate {r['deadline_miss_rate']:.4f}); "
        f"stale actions dropped {r['stale_actions_dropped']}",
        f"  safety interventions: {r['safety_interventions'] or 'none'}",
    ]
    if r.get("robot_diagnostics"):
        lines.append(f"  robot: {r['robot_diagnostics']}")
    if r.get("recording"):
        lines.append(f"  recording: {r['recording']}")
    if r.get("json"):
        lines.append(f"  stats: {r['json']}")
    return "\n".join(lines)


def build_robot(hardware_cfg: Any, cameras: list[str], image_size: int) -> Any:
    """Instantiate the robot from its hardware config (`_target_` + kwargs), with the task's cameras."""
    import hydra.utils
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(hardware_cfg, resolve=True)
    cfg.setdefault("cameras", list(cameras))
    if cameras:
        cfg.setdefault("image_size", image_size)
    try:
        return hydra.utils.instantiate(cfg, _convert_="all")
    except InstantiationException as e:
        raise ConfigError(f"hardware {cfg.get('name')}: {e.__cause__ or e}") from e


def run_checkpoint(cfg: Any) -> dict[str, Any]:
    """`protege run`: load `cfg.checkpoint`, build `cfg.hardware`, run with `cfg.runner`; returns the report."""
    from omegaconf import OmegaConf

    from protege.training import checkpoint as ckpt

    if not cfg.get("checkpoint"):
        raise ConfigError("protege run: expected checkpoint=<checkpoint or run dir>")
    ckpt_dir = ckpt.resolve_checkpoint(cfg.checkpoint)
    train_cfg = ckpt.load_config(ckpt_dir)
    policy = ckpt.load_policy(ckpt_dir, train_cfg, device=cfg.device, runtime=cfg.runner.get("runtime", "auto"))
    env = OmegaConf.to_container(train_cfg.task.get("env", {}), resolve=True)
    task = None
    if train_cfg.task.env_id == "franka":
        from protege.envs.franka import make_task

        task = make_task(env.get("task", "reach"))
    state_keys = list(cfg.runner.state_keys or (task.state_keys if task is not None else []))
    if not state_keys:
        raise ConfigError(f"protege run: task {train_cfg.task.name!r} is not a Franka task; set runner.state_keys "
                          "(robot fields such as [joint_pos, gripper]) to say what the policy observes")
    cameras = list(env.get("cameras", []))
    robot = build_robot(cfg.hardware, cameras, int(env.get("image_size", 96)))
    fields = OmegaConf.to_container(cfg.runner, resolve=True)
    fields.pop("state_keys", None)
    fields.pop("runtime", None)  # used when loading the policy
    settings = RunnerSettings(**fields)
    settings.rate_hz = settings.rate_hz or float(env.get("control_hz", train_cfg.task.fps))
    settings.instruction = settings.instruction or env.get("instruction")  # a language task's own instruction
    if settings.max_steps is None and env.get("max_episode_steps"):
        settings.max_steps = int(env["max_episode_steps"])
    if settings.out_dir is None:
        from datetime import datetime

        settings.out_dir = str(Path("runs") / f"run-{robot.name}-{datetime.now():%Y%m%d-%H%M%S}")
    runner = Runner(policy, robot, env.get("action_space", "ee_delta"), state_keys, cameras, task, settings,
                    device=cfg.device, provenance={"checkpoint": str(ckpt_dir)})
    try:
        return runner.run()
    finally:
        robot.close()
