"""Task registry: gymnasium envs with a `success` flag in `info`, each with its scripted expert.

One entry per env kind (`ENVS`) names the module, env class and expert class; they are imported on
first use, so listing or validating tasks imports no simulator (and no renderer). A task is a yaml
file in `protege/configs/task/` (its default config: env kwargs, obs keys, fps, demo count) whose
`env_id` names an entry here; an entry with `variants` is also addressable by variant name
(`task=door-open-v3` -> the `metaworld` task with `env.task=door-open-v3`).

`make_env(env_id, **kwargs)` and `make_expert(env_id, env, seed)`. Observations are dicts of named
arrays; stored in a replay buffer they become `obs/<name>`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from protege.errors import ConfigError


class Expert(Protocol):
    def reset(self) -> None: ...
    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class Variants:
    """Env variants addressable by name from the CLI without a yaml each (Meta-World's 50 tasks).
    `pattern` is checked first, so an unrelated typo never imports the simulator to list names."""

    task: str  # the yaml this expands to
    key: str  # config key (under task) that takes the name
    pattern: str  # regex a variant name matches
    names: str  # "module:function" returning the sorted names (imports the simulator)
    example: str


@dataclass(frozen=True)
class EnvSpec:
    module: str
    env: str
    expert: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)  # fixed kwargs that select this variant
    variants: Variants | None = None


ENVS: dict[str, EnvSpec] = {
    "pointmass": EnvSpec("protege.envs.pointmass", "PointMassEnv", "PointMassExpert", {"bimodal": False}),
    "pointmass_bimodal": EnvSpec("protege.envs.pointmass", "PointMassEnv", "PointMassExpert", {"bimodal": True}),
    "pointmass_image_goal": EnvSpec("protege.envs.pointmass", "PointMassEnv", "PointMassExpert",
                                    {"bimodal": False, "goal_in_state": False}),
    "pointmass_lang": EnvSpec("protege.envs.pointmass_lang", "LanguagePointMassEnv", "LanguagePointMassExpert"),
    "metaworld": EnvSpec("protege.envs.metaworld", "MetaWorldEnv", "MetaWorldExpert", variants=Variants(
        "metaworld", "env.task", r"^[a-z0-9-]+-v3$", "protege.envs.metaworld:task_names", "a Meta-World v3 name (task=door-open-v3)")),
    "metaworld_mt": EnvSpec("protege.envs.metaworld_mt", "MetaWorldMultiTaskEnv", "MetaWorldMultiTaskExpert"),
    "aloha_transfer_cube": EnvSpec("protege.envs.aloha", "AlohaEnv", "AlohaExpert", {"task": "transfer_cube"}),
    "aloha_insertion": EnvSpec("protege.envs.aloha", "AlohaEnv", "AlohaExpert", {"task": "insertion"}),
    "franka": EnvSpec("protege.envs.franka", "FrankaEnv", "FrankaExpert"),
    "robomimic": EnvSpec("protege.envs.robomimic", "RobomimicEnv", "RobomimicExpert"),
}


def _spec(env_id: str) -> EnvSpec:
    if env_id not in ENVS:
        raise ConfigError(f"unknown env {env_id!r}; expected one of {sorted(ENVS)}")
    return ENVS[env_id]


def _load(module: str, name: str) -> Callable[..., Any]:
    return getattr(importlib.import_module(module), name)


def make_env(env_id: str, **kwargs: Any) -> gym.Env:
    spec = _spec(env_id)
    return _load(spec.module, spec.env)(**spec.kwargs, **kwargs)


def _franka_task(env: dict[str, Any]) -> Any:
    from protege.envs.franka import make_task

    return make_task(env.get("task", "reach"))


def _aloha_task(task: str) -> Callable[[dict[str, Any]], Any]:
    def make(env: dict[str, Any]) -> Any:
        from protege.envs.aloha import AlohaHardwareTask

        return AlohaHardwareTask(task, env.get("max_episode_steps", 400))

    return make


# env id -> factory(env config) of the task a `protege run` robot executes: scene reset + success check
HARDWARE_TASKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "franka": _franka_task, "aloha_transfer_cube": _aloha_task("transfer_cube"), "aloha_insertion": _aloha_task("insertion")}


def make_hardware_task(env_id: str, env: dict[str, Any]) -> Any:
    """The hardware task of an env (`reset(robot, rng)`, `success(obs)`, `state_keys`,
    `max_episode_steps`), or None when the env has none (the runner then needs runner.state_keys)."""
    factory = HARDWARE_TASKS.get(env_id)
    return factory(env) if factory is not None else None


def make_expert(env_id: str, env: gym.Env, seed: int | None = None) -> Expert:
    spec = _spec(env_id)
    if spec.expert is None:
        raise ConfigError(f"env {env_id!r} has no scripted expert")
    return _load(spec.module, spec.expert)(env, seed)


def task_names() -> list[str]:
    """The task yaml files (`protege/configs/task/<name>.yaml`)."""
    from protege import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))


def expand_task(value: str) -> list[str]:
    """`task=<value>` as hydra overrides: a task yaml as is, a variant name as its yaml + the name."""
    if value in task_names():
        return [f"task={value}"]
    variants = [s.variants for s in ENVS.values() if s.variants]
    for v in variants:
        if re.match(v.pattern, value):
            module, fn = v.names.split(":")
            names = _load(module, fn)()
            if value in names:
                return [f"task={v.task}", f"task.{v.key}={value}"]
            import difflib

            close = difflib.get_close_matches(value, names, n=3)
            raise ConfigError(f"unknown task {value!r}; closest {v.task} names: {close or names[:4]}")
    alts = " or ".join(v.example for v in variants)
    raise ConfigError(f"unknown task {value!r}; expected one of {task_names()}" + (f", or {alts}" if alts else ""))
