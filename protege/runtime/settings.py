"""`RunnerSettings`: the one source of the runner's defaults.

`protege run` composes `runner.*` from this dataclass (registered as the hydra config group
`runner/default`, see `register_configs`), so the CLI, the Python API and the benchmarks cannot
disagree about a default. Imports nothing heavy: the CLI reads it before torch is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# exit codes of `protege run`, by how the run ended
EXIT_CODES = {"completed": 0, "policy_error": 1, "watchdog": 3, "robot_error": 4, "estop": 5, "SIGINT": 130, "SIGTERM": 143}


@dataclass
class RunnerSettings:
    rate_hz: float | None = None  # control rate; default: the task's control_hz / fps
    n_episodes: int = 1
    max_steps: int | None = None  # per episode; default: the task's max_episode_steps
    # "policy": the policy's own `temporal_ensemble` attribute; None: chunk execution; m (e.g. 0.01): ensembling
    temporal_ensemble: float | None | str = "policy"
    # switch | ensemble | rtc (real-time chunking: diffusion/flow policies inpaint the next chunk onto
    # the current one, chunking.py); None: from temporal_ensemble
    chunk_join: str | None = None
    execute_steps: int | None = None  # request the next chunk after this many steps of the current one (None: when it runs out)
    runtime: str = "auto"  # inference runtime: auto (= onnx) | onnx | aoti | eager (policies/export.py; cached in <checkpoint>/export/)
    inference_budget: float = 0.5  # fraction of a period the loop may wait for inference inside a tick
    watchdog_timeout: float = 1.0  # s without a fresh valid action -> the robot is stopped
    seed: int = 100_000  # episode k resets the (simulated) scene with seed + k, as `protege eval` does
    stop_on_success: bool = True
    record: bool = True  # every executed step -> <out_dir>/recording.zarr (a replay buffer)
    out_dir: str | None = None  # default (protege run): runs/run-<robot>-<time>
    # process: a spawned process (the policy's Python code never holds the loop's GIL; measured p99
    # jitter x1.8-x49 lower than a thread, README "Measured") | thread: any policy object, no start-up cost
    inference: str = "process"
    instruction: str | None = None  # the text a language-conditioned policy (VLA) is given; default: the task's
    state_keys: list[str] | None = None  # robot fields the policy's obs/state concatenates; default: the task's
    # s: a camera frame older than this (capture time vs the robot's clock) is not acted on: no policy
    # request from it (held steps counted as stale_frames); a camera that stops delivering trips the watchdog
    max_frame_age: float = 0.25
    image_codec: str | None = None  # recorded frames: jpeg[:quality] | png | raw (default jpeg:95)
    resize: str | None = None  # recorded frames resized to "HxW" (default: as captured)
    # False: Python's cyclic garbage collector is paused inside episodes (objects from before the run are
    # frozen, young ones collected between episodes); a collection inside a tick delays it (bench_runtime.py)
    gc_in_episodes: bool = False
    rt_priority: int = 50  # SCHED_FIFO priority of the control loop thread (Linux; 0: off; needs root or CAP_SYS_NICE)


def register_configs() -> None:
    """Register `RunnerSettings()` as hydra's `runner/default` (a plain dict node: OmegaConf's
    structured configs cannot type `float | None | str`; RunnerSettings(**cfg) checks the keys)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="runner", name="default", node=asdict(RunnerSettings()))
