"""`protege run`: load a checkpoint, build the robot from its hardware config, drive it with the
fixed-rate loop (`loop.py`), report (`report.py`).

The runtime package: `settings.py` (RunnerSettings, the one source of defaults), `loop.py` (the
loop), `inference.py` (the inference worker), `chunking.py` (how chunks join), `recorder.py` (the
run's replay buffer), `report.py` (timing statistics). The names tests and scripts use are
re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protege.errors import ConfigError
from protege.runtime.loop import Runner
from protege.runtime.report import format_report
from protege.runtime.settings import EXIT_CODES, RunnerSettings

__all__ = ["EXIT_CODES", "Runner", "RunnerSettings", "build_robot", "format_report", "run_checkpoint"]


def build_robot(hardware_cfg: Any, cameras: list[str], image_size: int | list[int],
                options: dict[str, Any] | None = None) -> Any:
    """Instantiate the robot from its hardware config (`_target_` + kwargs), with the task's cameras
    and the options its hardware task needs (e.g. which scene to load), unless the config sets them."""
    import hydra.utils
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(hardware_cfg, resolve=True)
    cfg.setdefault("cameras", list(cameras))
    if cameras:
        cfg.setdefault("image_size", image_size)
    for k, v in (options or {}).items():
        cfg.setdefault(k, v)
    try:
        return hydra.utils.instantiate(cfg, _convert_="all")
    except InstantiationException as e:
        raise ConfigError(f"hardware {cfg.get('name')}: {e.__cause__ or e}") from e


def settings_from_config(runner_cfg: Any, env: dict[str, Any], fps: float) -> RunnerSettings:
    """`cfg.runner` -> RunnerSettings, task-dependent defaults (rate, episode length, instruction) from the task's env."""
    from omegaconf import OmegaConf

    fields = OmegaConf.to_container(runner_cfg, resolve=True)
    unknown = sorted(set(fields) - set(RunnerSettings.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"runner: unknown setting(s) {unknown}; expected some of {sorted(RunnerSettings.__dataclass_fields__)}")
    s = RunnerSettings(**fields)
    s.rate_hz = s.rate_hz or float(env.get("control_hz", fps))
    s.instruction = s.instruction or env.get("instruction")  # a language task's own instruction
    if s.max_steps is None and env.get("max_episode_steps"):
        s.max_steps = int(env["max_episode_steps"])
    return s


def check_state_fields(robot: Any, state_keys: list[str] | dict[str, list[str]], task_name: str | None,
                       command: str = "run") -> None:
    """Fail before the robot moves when the policy observes (or a recording would store) a field this robot
    does not declare (a sim task's `goal_pos` on a real arm), instead of a KeyError on the first tick."""
    features = getattr(robot, "features", None)
    if features is None:
        return
    names = [n for group in state_keys.values() for n in group] if isinstance(state_keys, dict) else list(state_keys)
    missing = [n for n in names if n not in features.state and features.group(n) is None]
    if missing:
        raise ConfigError(f"protege {command}: task {task_name!r} observes {missing}, which robot {robot.name!r} does not "
                          f"provide (it declares {sorted(features.state)}); simulator-only fields do not exist on this "
                          "robot: use robot fields (state_keys=[...] names what is observed)")


def run_checkpoint(cfg: Any) -> dict[str, Any]:
    """`protege run`: load `cfg.checkpoint`, build `cfg.hardware`, run with `cfg.runner`; returns the report."""
    from omegaconf import OmegaConf

    from protege.envs import make_hardware_task
    from protege import fileio
    from protege.policies.base import load_policy

    if not cfg.get("checkpoint"):
        raise ConfigError("protege run: expected checkpoint=<checkpoint or run dir>")
    ckpt_dir = fileio.resolve_checkpoint(cfg.checkpoint)
    train_cfg = fileio.load_config(ckpt_dir)
    policy = load_policy(ckpt_dir, train_cfg, device=cfg.device, runtime=cfg.runner.get("runtime", "auto"))
    env = OmegaConf.to_container(train_cfg.task.get("env", {}), resolve=True)
    task = make_hardware_task(train_cfg.task.env_id, env)  # None: the task has no scene on this hardware
    settings = settings_from_config(cfg.runner, env, float(train_cfg.task.fps))
    state_keys = settings.state_keys or (task.state_keys if task is not None else [])
    if not state_keys:
        raise ConfigError(f"protege run: task {train_cfg.task.name!r} has no hardware task; set runner.state_keys "
                          "(robot fields such as [joint_pos, gripper]) to say what the policy observes")
    cameras = list(env.get("cameras", []))
    robot = build_robot(cfg.hardware, cameras, env.get("image_size", 96), getattr(task, "robot_options", None))
    if settings.out_dir is None:
        from datetime import datetime

        settings.out_dir = str(Path("runs") / f"run-{robot.name}-{datetime.now():%Y%m%d-%H%M%S}")
    try:  # the robot is closed whatever fails from here on (a refused field included)
        check_state_fields(robot, state_keys, train_cfg.task.name)
        action_space = env.get("action_space") or getattr(task, "action_space", "ee_delta")
        runner = Runner(policy, robot, action_space, state_keys, cameras, task, settings,
                        device=cfg.device, provenance={"checkpoint": str(ckpt_dir)})
        return runner.run()
    finally:
        robot.close()
