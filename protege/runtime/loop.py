"""The fixed-rate control loop: a trained policy drives a `Robot`.

Each tick (the robot's clock, `period = 1 / rate_hz`): read the robot, update the observation history
(`n_obs_steps`), collect a finished inference, start the next one, take this step's action from the
executor (`chunking.py`: how chunks join, when to request the next), turn it into a safe joint
command (`Controller`: action space, IK, safety) and send it, record the step (`recorder.py`).

Inference runs off the loop (`inference.py`), so the loop never waits for the policy. A request made
at step s returns a chunk whose first action belongs to step s; by the time it arrives the steps
already passed are dropped (counted as stale). The next request goes out `chunking.request_lead`
steps before the current chunk runs out. The loop thread asks for SCHED_FIFO priority
(`rt_priority`) so other processes cannot delay it. With a simulated clock (`robot.clock.realtime`
False) the loop always waits for inference: simulated time stands still meanwhile.

Cameras: each tick every camera the policy sees must have a frame no older than `max_frame_age`
(capture time on the robot's clock); frames are cropped/resized to the checkpoint's image shape
(`cameras.fit_frame`). A missing or too old frame is not acted on: no policy request is made from that
observation (the current chunk's actions continue, then the robot holds), counted as `missing_frames`
/ `stale_frames`. Frame ages go into the report (`frame_age_ms_p50/p99`), capture times into the
recording (`camera/<name>_t`).

When no action is available (policy late, action rejected by the safety layer, camera frame
missing or stale) the robot holds its last command; the `Watchdog` stops the run after `watchdog_timeout` s
without a fresh action. Ctrl-C / SIGTERM / `EStop.trigger` end the run; every ending goes through
`robot.stop()`. Timing statistics go into the report (`report.py`).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protege.errors import ConfigError
from protege.hardware.base import (Controller, EStop, Observation, RobotError, SafetyLayer, Watchdog,
                                   make_action_space, policy_observation)
from protege.hardware.cameras import CameraError, fit_frame
from protege.datasets.frames import ImageStorage
from protege.runtime.chunking import ActionExecutor, make_executor, request_lead
from protege.runtime.inference import InferenceWorker
from protege.runtime.recorder import Recorder
from protege.runtime.report import LATE_WAKE_S, LoopStats, build_report, write_report
from protege.runtime.settings import EXIT_CODES, RunnerSettings

log = logging.getLogger("protege.runtime")


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


@contextmanager
def _gc_watch(stats: LoopStats) -> Iterator[None]:
    """Time every collection of Python's cyclic GC while the runner runs (a gen-2 pass over torch's and
    MuJoCo's objects takes milliseconds), and freeze the objects that exist before the loop starts, so
    later passes do not walk them again."""
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            stats.gc_pauses.append(time.perf_counter() - started.pop())

    gc.collect()
    gc.freeze()
    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)
        gc.unfreeze()


class _Stop(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Runner:
    def __init__(
        self,
        policy: Any,
        robot: Any,
        action_space: str,
        state_keys: list[str] | dict[str, list[str]],
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
        # robot fields behind each state key: a list (-> obs/state) or {policy key name: fields}
        self.state_keys = dict(state_keys) if isinstance(state_keys, dict) else list(state_keys)
        self.robot_fields = list(robot.features.state)
        # the cameras: the checkpoint's image keys (+ `cameras`: more whose frames every observation needs)
        self.image_shapes = {k.removeprefix("obs/"): tuple(meta[k]["shape"]) for k in self.policy_keys
                             if meta.get(k, {}).get("kind") == "image"}
        self.cameras = [*self.image_shapes, *(c for c in cameras or [] if c not in self.image_shapes)]
        robot_cams = list(getattr(robot, "cameras", ()))
        unknown = [c for c in self.cameras if c not in robot_cams]
        if unknown:
            raise ConfigError(f"runner: the checkpoint observes camera(s) {unknown}, which robot {robot.name!r} does not "
                              f"have (its cameras: {robot_cams}); configure them under hardware.cameras (name -> backend)")
        self.device = torch.device(device)
        self.estop = estop or EStop()
        rate = self.s.rate_hz
        if not rate or rate <= 0:
            raise ConfigError(f"runner: rate_hz must be a positive number, got {rate}")
        self.period = 1.0 / float(rate)
        te = self.s.temporal_ensemble
        self.temporal_ensemble = getattr(policy, "temporal_ensemble", None) if te == "policy" else te
        if self.s.chunk_join == "rtc" and not getattr(policy, "supports_guide", False):
            raise ConfigError(f"runner.chunk_join=rtc needs a diffusion or flow policy (guided sampling); "
                              f"{type(policy).__name__} has none")
        self.action_space = make_action_space(action_space, robot.features)
        self.safety = SafetyLayer(robot.limits, self.period)
        self.max_steps = self.s.max_steps or (task.max_episode_steps if task is not None else None)
        if not self.max_steps:
            raise ConfigError("runner: max_steps is required when no task defines an episode length")
        self.out_dir = Path(self.s.out_dir) if self.s.out_dir else None
        attrs = {"provenance": {"source": "protege run", "robot": robot.name, **(provenance or {})},
                 "units": {"action": self.action_space.name},
                 **({"tasks": [self.s.instruction]} if self.language_keys else {})}
        self.recorder = Recorder(self.out_dir / "recording.zarr" if self.out_dir else None, 1.0 / self.period, attrs,
                                 enabled=self.s.record, image_storage=ImageStorage.parse(self.s.image_codec, self.s.resize))

    # ------------------------------------------------------------------------------ observations
    def _observe(self, obs: Observation, now: float) -> tuple[dict[str, np.ndarray] | None, str]:
        """The policy's view of `obs`, or (None, why) when a camera frame is missing or too old."""
        out = policy_observation(obs, self.state_keys, [])
        for cam in self.cameras:
            img, t = obs.images.get(cam), obs.image_t.get(cam)
            if img is None:
                self.stats.missing_frames += 1
                self.safety.intervene("missing_camera_frame", f"camera {cam!r} delivered no frame, holding")
                return None, f"camera frames missing ({cam!r})"
            age = 0.0 if t is None else now - t
            self.stats.frame_age.append(age)
            if age > self.s.max_frame_age:
                self.stats.stale_frames += 1
                self.safety.intervene("stale_camera_frame", f"camera {cam!r} frame {age * 1e3:.0f} ms old, holding")
                return None, f"camera {cam!r} frames too old ({age:.2f} s > max_frame_age {self.s.max_frame_age:g} s)"
            try:
                out[cam] = fit_frame(img, self.image_shapes.get(cam, img.shape), cam)
            except CameraError as e:
                raise _Stop("robot_error", f"{e}; robot stopped") from e
            self._frame_t[cam] = t
        return out, ""

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
        self.stats = LoopStats()
        self.episodes: list[dict[str, Any]] = []
        status, message = "completed", f"{self.s.n_episodes} episode(s) completed"
        self.policy.eval()
        worker = InferenceWorker(self.policy, self.device, self.s.inference)
        # the loop thread must get the GIL back quickly when it wakes; the default 5 ms switch
        # interval would let the inference thread's Python code delay a tick by up to 5 ms
        switch = sys.getswitchinterval()
        sys.setswitchinterval(2e-4)
        old_sched = _realtime_priority(self.s.rt_priority) if self.robot.clock.realtime else None
        try:
            with self.estop.signals(), _gc_watch(self.stats):
                try:
                    self.robot.connect()
                    log.info("runner: %s connected; %d episode(s) at %g Hz; Ctrl-C stops the robot",
                             self.robot.name, self.s.n_episodes, 1.0 / self.period)
                    for ep in range(self.s.n_episodes):
                        self._episode(ep, worker)
                except _Stop as e:
                    status, message = e.status, e.message
                except (RobotError, CameraError) as e:  # a camera that cannot start is a robot that cannot see
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
        report = build_report(status, message, self.stats, self.robot, 1.0 / self.period, self.episodes,
                              self.task is not None, temporal_ensemble=self.temporal_ensemble, chunk_join=self.s.chunk_join,
                              safety_interventions=dict(self.safety.counts), recording=self.recorder.path)
        if self.out_dir is not None:
            write_report(report, self.out_dir)
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
        robot = self.robot
        if self.task is not None and hasattr(robot, "reset_scene"):
            self.task.reset(robot, np.random.default_rng(self.s.seed + ep))
        executor = make_executor(self.temporal_ensemble, self.s.chunk_join, self.s.execute_steps)
        self.policy.reset()
        result = {"episode": ep, "seed": self.s.seed + ep, "success": False, "length": 0}
        self.episodes.append(result)
        self._frame_t: dict[str, float | None] = {}
        if not self.s.gc_in_episodes:
            gc.disable()  # no collection inside a tick; young objects are collected when the episode ends
        try:
            obs = robot.read()
            pobs, why = self._observe(obs, robot.clock.now())
            if pobs is None:
                raise _Stop("robot_error", f"{why} at the start of episode {ep}; not starting")
            history: deque = deque([pobs] * self.policy.n_obs_steps, maxlen=self.policy.n_obs_steps)
            if worker.busy:  # a request of the previous episode still in flight: its chunk belongs to that scene
                worker.get(None)
            # first chunk synchronously (also warms the policy up): the loop starts with an action. Its
            # latency (lazy init, caches) is reported apart, not used for the request lead.
            worker.submit(0, self._window(history))
            self._add(worker.get(None), executor, 0, first=True)
            self._ticks(ep, worker, executor, history, pobs, result)
        finally:
            if self.task is not None and hasattr(self.task, "episode_info"):  # e.g. ALOHA's max reward stage
                result.update(self.task.episode_info())
            self.recorder.end_episode()
            if not self.s.gc_in_episodes:
                gc.enable()
                gc.collect()

    def _ticks(self, ep: int, worker: InferenceWorker, executor: ActionExecutor, history: deque,
               last_good: dict[str, np.ndarray], result: dict[str, Any]) -> None:
        robot, clock, realtime, st = self.robot, self.robot.clock, self.robot.clock.realtime, self.stats
        controller = Controller(robot.kinematics, self.action_space, self.safety)
        controller.reset()
        watchdog = Watchdog(self.period, self.s.watchdog_timeout)
        hold_reason = ""
        t_next = clock.now()
        prev_wake, n_gc = None, len(st.gc_pauses)
        for step in range(self.max_steps + 1):
            clock.sleep_until(t_next)
            now = clock.now()
            if prev_wake is not None:  # periods within an episode (not across scene resets)
                st.periods.append(now - prev_wake)
            prev_wake = now
            st.wake.append(now)
            st.scheduled.append(t_next)
            if realtime and now - t_next > LATE_WAKE_S:  # a GC pass since the last tick, else the OS or the GIL
                st.late_wakes["gc" if len(st.gc_pauses) > n_gc else "os_or_gil"] += 1
            n_gc = len(st.gc_pauses)
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
            pobs, why = self._observe(obs, clock.now())
            if pobs is None:
                hold_reason = why
            else:
                history.append(pobs)
                last_good = pobs
            # inference: collect, then request the next chunk early enough for the measured latency
            self._add(worker.get(0), executor, step)
            # the expected delay until a request's chunk arrives, in steps: from the measured latency (the
            # first chunk's before any asynchronous call is measured; rtc freezes that many actions)
            delay = request_lead(st.latency or st.first_latency, self.period, self.s.inference_budget) if realtime else 0
            # until one asynchronous call has been measured, the next chunk is requested right away (the
            # synchronous first chunk, measured while the loop idled, underestimates a loaded machine):
            # a few more stale actions instead of missed deadlines
            lead = self.max_steps if realtime and not st.latency else delay
            if pobs is not None and not worker.busy and executor.wants_chunk(step + lead):
                # rtc: the `delay` actions executed before the chunk can arrive are frozen in it
                worker.submit(step, self._window(history), executor.guide(step, delay))
            if worker.busy and executor.needs_chunk(step):
                wait = None if not realtime else max(0.0, t_next + self.s.inference_budget * self.period - clock.now())
                self._add(worker.get(wait), executor, step)
            action = executor.action(step)
            fresh = False
            if action is not None:
                cmd, fresh = controller(action, obs)
                if not fresh:
                    hold_reason = "actions rejected by the safety layer (" + ", ".join(
                        k for k in self.safety.counts if "camera_frame" not in k) + ")"
            else:
                cmd = controller.hold(obs)
                if pobs is not None:
                    st.deadline_misses += 1
                    st.miss_causes["inference_slower_than_lead" if st.latency else "no_latency_measured_yet"] += 1
                    hold_reason = (f"the policy missed its deadline (latency {self._latency_ms():.0f} ms, "
                                   f"period {self.period * 1e3:.0f} ms)")
            if fresh:
                watchdog.feed(now)
            elif watchdog.state(now) == "expired":
                raise _Stop("watchdog", f"watchdog: no valid action for {self.s.watchdog_timeout:g} s at step {step} "
                            f"of episode {ep}: {hold_reason}; robot stopped")
            robot.command(cmd)
            executed = np.asarray(action, np.float32) if fresh else self.action_space.hold_action(obs, cmd)
            self._record(obs, last_good, executed, cmd, held=not fresh)
            result["length"] = step + 1
            st.ticks += 1
            t_next += self.period
            if realtime and clock.now() > t_next:
                st.overruns += 1
                t_next = clock.now()  # do not try to catch up with a burst of late ticks

    def _add(self, res: tuple | None, executor: ActionExecutor, step: int, first: bool = False) -> None:
        if res is None:
            return
        start, chunk, latency, error = res
        (self.stats.first_latency if first else self.stats.latency).append(latency)
        if error is not None:
            raise _Stop("policy_error", f"policy raised {error} (at step {step}); robot stopped")
        executor.add(chunk, start)
        self.stats.stale_actions_dropped += min(len(chunk), max(0, step - start))

    def _latency_ms(self) -> float:
        return 1e3 * max(self.stats.latency[-10:], default=0.0)

    def _record(self, obs: Observation, pobs: dict[str, np.ndarray], action: np.ndarray, cmd: Any, held: bool) -> None:
        if not self.recorder.enabled:
            return
        row = {f"obs/{k}": v for k, v in pobs.items()}
        # this tick's state even if a frame is missing
        row.update({f"obs/{k}": v for k, v in policy_observation(obs, self.state_keys, []).items()})
        row.update({"action": action, "robot/t": np.float64(obs.t), "command/q": cmd.q,
                    "command/gripper": np.asarray(cmd.gripper, np.float32), "runner/held": np.uint8(held)})
        row.update({f"robot/{k}": obs.get(k) for k in self.robot_fields})  # every state field the robot declares
        for cam in self.cameras:  # capture time of the recorded frame (robot clock)
            row[f"camera/{cam}_t"] = np.float64(np.nan if self._frame_t.get(cam) is None else self._frame_t[cam])
        if self.language_keys:  # the recording is a language-labelled demo: task 0 = the instruction (attrs["tasks"])
            row["task"] = np.int64(0)
        self.recorder.add(row)
