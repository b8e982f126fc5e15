"""Policy rollouts in N parallel gymnasium envs: success rate, returns, lengths, optional video.

Envs run in a gymnasium vector env with autoreset disabled: when an env finishes an episode we
reset just that env (with the next episode's seed) so all N envs stay busy until `n_episodes`
episodes are done. Episode k always uses seed `seed + k`, so results do not depend on `n_envs`
(up to the policy's own sampling noise). Each env keeps its own observation history
(`n_obs_steps`, edge-padded at the start as in training) and action executor (chunk queue or
temporal ensembling, `protege/runtime/chunking.py`, the same as the real-time runner); a new chunk is
predicted, batched over the envs whose executor asks for one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from protege.errors import ConfigError
from protege.policies.base import Policy
from protege.policies.guidance import ChunkGuide
from protege.runtime.chunking import make_executor


def make_vector_env(env_fn: Callable[[int], gym.Env], n_envs: int, asynchronous: bool = False) -> gym.vector.VectorEnv:
    """`env_fn(i)` builds env i (env 0 renders, if anything does)."""
    fns = [(lambda i=i: env_fn(i)) for i in range(n_envs)]
    cls = gym.vector.AsyncVectorEnv if asynchronous and n_envs > 1 else gym.vector.SyncVectorEnv
    return cls(fns, autoreset_mode=gym.vector.AutoresetMode.DISABLED)


@torch.no_grad()
def evaluate(
    policy: Policy,
    env_fn: Callable[[int], gym.Env],
    n_episodes: int,
    n_envs: int = 10,
    seed: int = 100_000,
    video_path: str | Path | None = None,
    video_episodes: int = 2,
    asynchronous: bool = False,
    progress: bool = True,
    temporal_ensemble: float | None | str = "policy",
    chunk_join: str | None = None,
    delay_steps: int = 0,
    execute_steps: int | None = None,
) -> dict[str, Any]:
    """`temporal_ensemble`: "policy" (the policy's own setting), None (chunk execution) or m.
    `chunk_join`: switch | ensemble | rtc (default: from `temporal_ensemble`); `execute_steps`: request
    the next chunk after this many steps of the current one. `delay_steps`: simulated inference delay:
    a chunk requested at step s is predicted from the observation at s but executed from step s + d
    (the env runs the current chunk meanwhile), as in the real-time runner; the summary reports the
    action jerk (third difference) at chunk joins."""
    policy.eval()
    n_envs = max(1, min(n_envs, n_episodes))
    envs = make_vector_env(env_fn, n_envs, asynchronous)
    try:
        check_env_matches_policy(policy, envs.single_observation_space)
    except ConfigError:
        envs.close()
        raise
    if temporal_ensemble == "policy":
        temporal_ensemble = getattr(policy, "temporal_ensemble", None)
    if chunk_join == "rtc" and not getattr(policy, "supports_guide", False):
        envs.close()
        raise ConfigError(f"chunk_join=rtc needs a diffusion or flow policy (guided sampling); {type(policy).__name__} has none")
    executors = [make_executor(temporal_ensemble, chunk_join, execute_steps) for _ in range(n_envs)]
    joins = JoinStats(n_envs)
    pending: list[tuple[int, int, np.ndarray] | None] = [None] * n_envs  # (arrival step, request step, chunk)
    device = policy.device
    To, obs_keys = policy.n_obs_steps, [k for k in policy.obs_keys]
    names = [k.removeprefix("obs/") for k in obs_keys]

    obs, _ = envs.reset(seed=[seed + i for i in range(n_envs)])
    history = {k: np.repeat(np.asarray(obs[n])[:, None], To, axis=1) for k, n in zip(obs_keys, names)}
    episode_of = np.arange(n_envs)  # which episode each env is running (>= n_episodes: idle filler)
    started = n_envs
    ret = np.zeros(n_envs)
    length = np.zeros(n_envs, dtype=np.int64)
    results: dict[int, dict[str, Any]] = {}
    frames: list[np.ndarray] = []
    record = video_path is not None and video_episodes > 0
    extra_keys: set[str] = set()
    latencies = []
    bar = tqdm(total=n_episodes, desc="eval", unit="ep", disable=not progress)
    t_start = time.perf_counter()
    env0_episodes = 0  # the video shows env 0's first `video_episodes` episodes
    if record:
        record = _grab_frame(envs, frames)
    while len(results) < n_episodes:
        for i, p in enumerate(pending):  # chunks whose simulated delay has passed (or that the env waits for)
            if p is not None and (p[0] <= length[i] or executors[i].needs_chunk(int(length[i]))):
                executors[i].add(p[2], p[1])
                pending[i] = None
                joins.joined[i] = True
        need = [i for i in range(n_envs) if pending[i] is None and executors[i].wants_chunk(int(length[i]) + delay_steps)]
        for group, guide in _guide_groups(executors, need, length, delay_steps):
            batch = {k: torch.from_numpy(history[k][group]).to(device) for k in obs_keys}
            t0 = time.perf_counter()
            chunk = (policy.predict_action(batch) if guide is None else policy.predict_action(batch, guide=guide)).float().cpu().numpy()
            latencies.append(time.perf_counter() - t0)
            for j, i in enumerate(group):
                if delay_steps and not executors[i].needs_chunk(int(length[i])):
                    pending[i] = (int(length[i]) + delay_steps, int(length[i]), chunk[j])
                else:  # no action to run meanwhile (episode start): the env waits for this chunk
                    executors[i].add(chunk[j], int(length[i]))
                    joins.joined[i] = True
        action = np.stack([executors[i].action(int(length[i])) for i in range(n_envs)])
        joins.record(action)
        obs, reward, terminated, truncated, info = envs.step(action)
        ret += reward
        length += 1
        for k, n in zip(obs_keys, names):
            history[k] = np.concatenate([history[k][:, 1:], np.asarray(obs[n])[:, None]], axis=1)
        done = np.logical_or(terminated, truncated)
        if record:
            record = _grab_frame(envs, frames)
            env0_episodes += int(done[0])
            record = record and env0_episodes < video_episodes
        if not done.any():
            continue
        reset_seeds: list[int | None] = [None] * n_envs
        for i in np.flatnonzero(done):
            ep = int(episode_of[i])
            if ep < n_episodes:
                res = {"episode": ep, "seed": seed + ep, "success": bool(_info(info, "success", i)),
                       "return": float(ret[i]), "length": int(length[i])}
                for key in info:
                    if not key.startswith("_") and key != "success" and isinstance(_info(info, key, i), (str, int, float, bool)):
                        res[key] = _info(info, key, i)
                        extra_keys.add(key)
                results[ep] = res
                bar.update(1)
            episode_of[i] = started
            started += 1
            reset_seeds[i] = seed + int(episode_of[i])
            ret[i], length[i] = 0.0, 0
            executors[i].reset()
            pending[i] = None
            joins.reset(i)
        if len(results) >= n_episodes:
            break
        obs, _ = envs.reset(seed=reset_seeds, options={"reset_mask": done})
        for k, n in zip(obs_keys, names):
            history[k][done] = np.asarray(obs[n])[done][:, None]
        policy.reset()
    bar.close()
    envs.close()
    wall = time.perf_counter() - t_start
    episodes = [results[i] for i in range(n_episodes)]
    summary: dict[str, Any] = {
        "success_rate": float(np.mean([e["success"] for e in episodes])),
        "n_episodes": n_episodes,
        "mean_return": float(np.mean([e["return"] for e in episodes])),
        "mean_length": float(np.mean([e["length"] for e in episodes])),
        "n_envs": n_envs,
        "seed": seed,
        "wall_time_s": wall,
        "inference_ms_median": float(np.median(latencies) * 1e3) if latencies else None,
        "temporal_ensemble": temporal_ensemble,
        "chunk_join": chunk_join or ("switch" if temporal_ensemble is None else "ensemble"),
        "delay_steps": delay_steps,
        **joins.summary(),
        "episodes": episodes,
    }
    for key in sorted(extra_keys):  # e.g. the point-mass 'route' -> counts per value, 'distance' -> its mean
        values = [e.get(key) for e in episodes]
        if all(isinstance(v, float) for v in values):
            summary[f"{key}_mean"] = float(np.mean(values))
        else:
            names = [str(v) for v in values]
            summary[f"{key}_counts"] = {v: names.count(v) for v in sorted(set(names))}
    if video_path is not None and frames:
        summary["video"] = str(write_video(video_path, frames, fps=_render_fps(envs)))
    return summary


class JoinStats:
    """Action jerk |a_t − 3a_{t−1} + 3a_{t−2} − a_{t−3}| (L2 over the action) of the executed actions:
    at chunk joins (the first step executed from a newly arrived chunk) and over all steps."""

    def __init__(self, n_envs: int) -> None:
        self.history: list[list[np.ndarray]] = [[] for _ in range(n_envs)]
        self.joined = np.zeros(n_envs, bool)
        self.at_joins: list[float] = []
        self.all_steps: list[float] = []

    def reset(self, i: int) -> None:
        self.history[i], self.joined[i] = [], False

    def record(self, actions: np.ndarray) -> None:
        for i, a in enumerate(actions):
            h = self.history[i] = [*self.history[i][-3:], np.asarray(a, np.float64)]
            if len(h) == 4:
                jerk = float(np.linalg.norm(h[3] - 3 * h[2] + 3 * h[1] - h[0]))
                self.all_steps.append(jerk)
                if self.joined[i]:
                    self.at_joins.append(jerk)
        self.joined[:] = False

    def summary(self) -> dict[str, float | int | None]:
        mean = lambda x: float(np.mean(x)) if x else None  # noqa: E731
        return {"join_jerk_mean": mean(self.at_joins), "jerk_mean": mean(self.all_steps), "n_joins": len(self.at_joins)}


def _guide_groups(executors: list[Any], need: list[int], length: np.ndarray, delay: int) -> list[tuple[list[int], Any]]:
    """Envs that need a chunk, grouped so each group is one batched call: unguided ones together,
    guided ones (real-time chunking) by guide shape, their targets stacked (B, n, A)."""
    groups: dict[Any, tuple[list[int], list[Any]]] = {}
    for i in need:
        g = executors[i].guide(int(length[i]), delay)
        key = None if g is None else (len(g.target), g.frozen)
        groups.setdefault(key, ([], []))
        groups[key][0].append(i)
        groups[key][1].append(g)
    out = []
    for key, (idx, guides) in groups.items():
        if key is None:
            out.append((idx, None))
        else:
            g = guides[0]
            out.append((idx, ChunkGuide(np.stack([x.target for x in guides]), g.weights, g.frozen, g.max_weight)))
    return out


def check_env_matches_policy(policy: Policy, space: gym.Space) -> None:
    """Every observation key the policy was trained on must come out of the env with the same shape
    (camera names and image sizes in particular): fail before the first rollout, not inside it."""
    provided = {k: tuple(v.shape) for k, v in getattr(space, "spaces", {}).items()}
    meta = getattr(policy, "shape_meta", {})  # duck-typed policies (e.g. a scripted expert) may have none
    for key in policy.obs_keys:
        name = key.removeprefix("obs/")
        want, kind = tuple(meta.get(key, {}).get("shape", ())), meta.get(key, {}).get("kind", "observation")
        if name not in provided:
            raise ConfigError(f"the policy was trained on {kind} {name!r} {want} but the env provides {provided}; "
                              f"set the env's cameras/observations to match the checkpoint")
        if key in meta and provided[name] != want:
            raise ConfigError(f"the policy was trained on {kind} {name!r} with shape {want} but the env gives {provided[name]}; "
                              f"set the env's image size / observations to match the checkpoint")


def _info(info: dict[str, Any], key: str, i: int) -> Any:
    value = info.get(key)
    if value is None or not info.get(f"_{key}", np.ones(i + 1, bool))[i]:
        return None
    return value[i].item() if hasattr(value[i], "item") else value[i]


def _grab_frame(envs: gym.vector.VectorEnv, frames: list[np.ndarray]) -> bool:
    """Render env 0; on any rendering failure, warn once and stop recording (state-only still works)."""
    try:
        frame = envs.call("render")[0]
    except Exception as e:  # no GL backend, missing libOSMesa, ...
        warnings.warn(f"rendering failed, no video will be written: {e}", stacklevel=2)
        return False
    if frame is None:
        return False
    frames.append(np.asarray(frame))
    return True


def _render_fps(envs: gym.vector.VectorEnv) -> int:
    fps = (envs.metadata or {}).get("render_fps") or 20
    return int(min(fps, 30))


def write_video(path: str | Path, frames: list[np.ndarray], fps: int = 20) -> Path:
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1)
    tmp.replace(path)
    return path


