"""Task registry: gymnasium envs with a `success` flag in `info`, each with a scripted expert.

`make_env(env_id, **kwargs)` and `make_expert(env_id, env, seed)`. Observations are dicts of named
arrays; stored in a replay buffer they become `obs/<name>`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from protege.errors import ConfigError


class Expert(Protocol):
    def reset(self) -> None: ...
    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray: ...


def _pointmass(bimodal: bool) -> Callable[..., gym.Env]:
    def make(**kwargs: Any) -> gym.Env:
        from protege.envs.pointmass import PointMassEnv

        return PointMassEnv(bimodal=bimodal, **kwargs)

    return make


def _metaworld(**kwargs: Any) -> gym.Env:
    from protege.envs.metaworld import MetaWorldEnv

    return MetaWorldEnv(**kwargs)


def _aloha(task: str) -> Callable[..., gym.Env]:
    def make(**kwargs: Any) -> gym.Env:
        from protege.envs.aloha import AlohaEnv

        return AlohaEnv(task=task, **kwargs)

    return make


def _franka(**kwargs: Any) -> gym.Env:
    from protege.envs.franka import FrankaEnv

    return FrankaEnv(**kwargs)


def _pointmass_lang(**kwargs: Any) -> gym.Env:
    from protege.envs.pointmass_lang import LanguagePointMassEnv

    return LanguagePointMassEnv(**kwargs)


def _metaworld_mt(**kwargs: Any) -> gym.Env:
    from protege.envs.metaworld_mt import MetaWorldMultiTaskEnv

    return MetaWorldMultiTaskEnv(**kwargs)


ENVS: dict[str, Callable[..., gym.Env]] = {
    "franka": _franka,
    "pointmass": _pointmass(False),
    "pointmass_bimodal": _pointmass(True),
    "metaworld": _metaworld,
    "aloha_transfer_cube": _aloha("transfer_cube"),
    "aloha_insertion": _aloha("insertion"),
    "pointmass_lang": _pointmass_lang,
    "metaworld_mt": _metaworld_mt,
}


def make_env(env_id: str, **kwargs: Any) -> gym.Env:
    if env_id not in ENVS:
        raise ConfigError(f"unknown env {env_id!r}; expected one of {sorted(ENVS)}")
    return ENVS[env_id](**kwargs)


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
    if env_id == "pointmass_lang":
        from protege.envs.pointmass_lang import LanguagePointMassExpert

        return LanguagePointMassExpert(env, seed)
    if env_id == "metaworld_mt":
        from protege.envs.metaworld_mt import MetaWorldMultiTaskExpert

        return MetaWorldMultiTaskExpert(env, seed)
    if env_id.startswith("pointmass"):
        from protege.envs.pointmass import PointMassExpert

        return PointMassExpert(env, seed)
    if env_id == "metaworld":
        from protege.envs.metaworld import MetaWorldExpert

        return MetaWorldExpert(env, seed)
    if env_id.startswith("aloha_"):
        from protege.envs.aloha import AlohaExpert

        return AlohaExpert(env, seed)
    if env_id == "franka":
        from protege.envs.franka import FrankaExpert

        return FrankaExpert(env, seed)
    raise ConfigError(f"env {env_id!r} has no scripted expert")
