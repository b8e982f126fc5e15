"""Scripted-expert demonstrations -> replay buffer (resumable: reruns add only what is missing)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from protege.datasets.frames import ImageStorage
from protege.datasets.replay_buffer import ReplayBuffer
from protege.envs import make_env, make_expert
from protege.errors import ProtegeError


def buffer_key(obs_name: str) -> str:
    """Env observation name -> buffer key: `task` (a language env's instruction index into its
    `tasks` strings) is the buffer's top-level `task` key (kind language); the rest are `obs/<name>`."""
    return "task" if obs_name == "task" else f"obs/{obs_name}"


def run_expert_episode(env: Any, expert: Any, seed: int) -> tuple[dict[str, np.ndarray], bool]:
    """One episode of the expert; returns time-major arrays (`obs/<name>`, `action`) and success."""
    obs, _ = env.reset(seed=seed)
    expert.reset()
    steps: dict[str, list[np.ndarray]] = {buffer_key(k): [] for k in obs}
    steps["action"] = []
    success = False
    while True:
        action = expert(obs)
        for k, v in obs.items():
            steps[buffer_key(k)].append(v)
        steps["action"].append(action)
        obs, _, terminated, truncated, info = env.step(action)
        success = success or bool(info.get("success", False))
        if terminated or truncated:
            break
    return {k: np.stack(v) for k, v in steps.items()}, success


def collect(
    env_id: str,
    env_kwargs: dict[str, Any],
    n_episodes: int,
    out: str | Path,
    fps: float,
    seed: int = 0,
    only_success: bool = True,
    progress: bool = True,
    image_storage: ImageStorage | None = None,
) -> ReplayBuffer:
    """Append expert episodes to the buffer at `out` until it holds `n_episodes`.

    Each episode is committed on its own, so an interrupted collection keeps what it finished and
    a rerun continues from there (seeds continue where the last run stopped). `image_storage`: how
    camera frames are stored (default JPEG quality 95; a resumed buffer must use the same).
    """
    env = make_env(env_id, **env_kwargs)
    expert = make_expert(env_id, env, seed=seed)
    attrs: dict[str, Any] = {"provenance": {"source": "scripted expert", "env_id": env_id, "env_kwargs": env_kwargs}}
    attrs.update(getattr(env.unwrapped, "buffer_attrs", {}))  # e.g. robomimic's env_args, as its datasets carry them
    tasks = list(getattr(env.unwrapped, "tasks", []))  # instruction strings of a language-conditioned env
    if tasks:
        attrs["tasks"] = tasks
    buf = ReplayBuffer.open_or_create(str(out), fps=fps, attrs=attrs, image_storage=image_storage)
    if tasks and list(buf.attrs.get("tasks", [])) != tasks:
        raise ProtegeError(f"{out}: holds instructions {buf.attrs.get('tasks')}, the env {env_id} has {tasks}; use another out=")
    state = dict(buf.attrs.get("collect", {}))
    next_seed = int(state.get("next_seed", seed))
    if buf.n_episodes and "next_seed" not in state:
        next_seed += buf.n_episodes
    attempts, failures, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=n_episodes, initial=min(buf.n_episodes, n_episodes), desc=f"collect {env_id}", unit="ep", disable=not progress)
    while buf.n_episodes < n_episodes:
        episode, success = run_expert_episode(env, expert, next_seed)
        next_seed += 1
        attempts += 1
        if success or not only_success:
            buf.append_episode(episode)
            bar.update(1)
        else:
            failures += 1
            if attempts >= 20 and failures > 0.5 * attempts:
                raise ProtegeError(f"{env_id}: the scripted expert failed {failures}/{attempts} episodes; refusing to collect")
        buf.update_attrs(collect={"next_seed": next_seed, "only_success": only_success})
    bar.close()
    env.close()
    if attempts:
        dt = time.perf_counter() - t0
        print(f"collected {attempts - failures} episodes ({failures} failed expert runs dropped) in {dt:.1f}s -> {out}")
    return buf
