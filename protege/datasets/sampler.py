"""Episode-aware window sampler: indices computed once, whole batches gathered with numpy.

A window is `horizon` consecutive steps starting `n_obs_steps - 1` steps before the "current"
step. Observations use the first `n_obs_steps` steps of the window, actions all `horizon` steps.
Steps outside the episode are edge-padded (repeat the first/last frame) and flagged in
`action_is_pad`. As in Diffusion Policy, windows may start `pad_before` steps before an episode and
end `pad_after` steps after it, so every step of every episode is a "current" step of some window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from protege.datasets.replay_buffer import ReplayBuffer


def split_episodes(n_episodes: int, val_ratio: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random train/val split by episode (never by step, so val windows are unseen episodes)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_episodes)
    n_val = int(round(n_episodes * val_ratio))
    if val_ratio > 0 and n_episodes > 1:
        n_val = min(max(n_val, 1), n_episodes - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class SequenceSampler:
    """Windows over a replay buffer. `gather(indices)` returns a batch as numpy arrays:
    obs keys `(B, n_obs_steps, ...)`, `action` `(B, horizon, A)`, `action_is_pad` `(B, horizon)`.
    """

    def __init__(
        self,
        buffer: ReplayBuffer,
        obs_keys: Sequence[str],
        n_obs_steps: int,
        horizon: int,
        episodes: np.ndarray | None = None,
        pad_before: int | None = None,
        pad_after: int | None = None,
        action_key: str = "action",
        horizon_obs_keys: Sequence[str] = (),
    ) -> None:
        """`horizon_obs_keys`: obs keys gathered over the whole window `(B, horizon, ...)`, e.g. the
        future proprioception ACT-JEPA predicts; the others cover the first `n_obs_steps` steps."""
        if horizon < n_obs_steps:
            raise ValueError(f"horizon ({horizon}) must be >= n_obs_steps ({n_obs_steps})")
        for k in [*obs_keys, action_key]:
            buffer[k]  # raises a DataError naming the key if it is missing
        self.buffer = buffer
        self.obs_keys = list(obs_keys)
        self.obs_steps = {k: horizon if k in horizon_obs_keys else n_obs_steps for k in self.obs_keys}
        if unknown := set(horizon_obs_keys) - set(self.obs_keys):
            raise ValueError(f"horizon_obs_keys {sorted(unknown)} are not among the obs keys {self.obs_keys}")
        self.action_key = action_key
        self.n_obs_steps = n_obs_steps
        self.horizon = horizon
        pad_before = n_obs_steps - 1 if pad_before is None else pad_before
        pad_after = horizon - n_obs_steps if pad_after is None else pad_after
        ends = buffer.episode_ends
        starts = np.concatenate([[0], ends[:-1]])
        episodes = np.arange(len(ends)) if episodes is None else np.asarray(episodes, dtype=np.int64)
        lo, hi = starts[episodes], ends[episodes]
        # windows per episode: first starts at lo - pad_before, last ends at hi + pad_after
        n_win = np.maximum(hi - lo - horizon + pad_before + pad_after + 1, 1)
        ep_of_window = np.repeat(np.arange(len(episodes)), n_win)
        offset_in_ep = np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win)
        self.window_start = (lo[ep_of_window] - pad_before + offset_in_ep).astype(np.int64)
        self.window_lo = lo[ep_of_window].astype(np.int64)
        self.window_hi = hi[ep_of_window].astype(np.int64)
        self._arange = np.arange(horizon, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.window_start)

    def gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Vectorised gather of windows `idx` (no Python loop over samples)."""
        idx = np.asarray(idx, dtype=np.int64)
        t = self.window_start[idx, None] + self._arange  # (B, H) absolute step indices
        lo, hi = self.window_lo[idx, None], self.window_hi[idx, None]
        tc = np.clip(t, lo, hi - 1)
        data = self.buffer.data
        out = {k: np.asarray(data[k][tc[:, : self.obs_steps[k]].ravel()]).reshape(
            len(idx), self.obs_steps[k], *data[k].shape[1:]) for k in self.obs_keys}
        out[self.action_key] = np.asarray(data[self.action_key][tc.ravel()]).reshape(
            len(idx), self.horizon, *data[self.action_key].shape[1:])
        out["action_is_pad"] = (t < lo) | (t >= hi)
        return out


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class WindowDataset(torch.utils.data.Dataset):
    """torch `Dataset` over the same windows, for DataLoader users (workers, DDP samplers).

    `__getitems__` lets a DataLoader fetch a whole batch with one vectorised gather; pass
    `collate_fn=WindowDataset.collate` so the already-batched dict is used as is.
    """

    def __init__(self, sampler: SequenceSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in to_torch(self.sampler.gather(np.array([i]))).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return to_torch(self.sampler.gather(np.asarray(indices)))

    @staticmethod
    def collate(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch
