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


def _pointmass(bimodal: bool, goal_in_state: bool = True) -> Callable[..., gym.Env]:
    def make(**kwargs: Any) -> gym.Env:
        from protege.envs.pointmass import PointMassEnv

        return PointMassEnv(bimodal=bimodal, goal_in_state=goal_in_state, **kwargs)

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
    "pointmass_image_goal": _pointmass(False, goal_in_state=False),
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
