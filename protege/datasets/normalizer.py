"""Per-key affine normalizer that lives inside the policy (and so inside its checkpoint).

`normalize(key, x) = x * scale + offset`. Modes:
- `minmax`: data range -> [-1, 1] (the Diffusion Policy convention for actions and low-dim obs);
- `gaussian`: zero mean, unit variance;
- `quantile`: 1st..99th percentile -> [-1, 1], clipped (OpenVLA's action normalisation: a few outlier
  actions do not squash the rest of the range);
- `identity`: unchanged (images are scaled by their encoder instead).
Constant dimensions get scale 1 so they are centred, never divided by ~0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

MODES = ("minmax", "gaussian", "quantile", "identity")
QUANTILES = (0.01, 0.99)
_EPS = 1e-4


class _Stats(nn.Module):
    def __init__(self, shape: tuple[int, ...], mode: str) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"normalizer mode {mode!r}: expected one of {MODES}")
        self.mode = mode
        for name in ("scale", "offset", "min", "max", "mean", "std"):
            self.register_buffer(name, torch.ones(shape) if name in ("scale", "std") else torch.zeros(shape))
        self.register_buffer("fitted", torch.tensor(mode == "identity"))


class Normalizer(nn.Module):
    def __init__(self, spec: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
        """`spec` maps a key to (per-step shape of its statistics, mode)."""
        super().__init__()
        # nn.Module names may not contain '.', keys like 'obs/state' are fine as they are.
        self.stats = nn.ModuleDict({k: _Stats(tuple(shape), mode) for k, (shape, mode) in spec.items()})

    def fit(self, data: Mapping[str, np.ndarray]) -> Normalizer:
        """Compute statistics from `(N, *shape)` arrays (all steps of the training episodes)."""
        for key, st in self.stats.items():
            if st.mode == "identity":
                continue
            x = np.asarray(data[key], dtype=np.float64).reshape(-1, *st.scale.shape)
            lo, hi, mean, std = x.min(0), x.max(0), x.mean(0), x.std(0)
            if st.mode in ("minmax", "quantile"):
                if st.mode == "quantile":
                    lo, hi = np.quantile(x, QUANTILES[0], axis=0), np.quantile(x, QUANTILES[1], axis=0)
                rng = hi - lo
                scale = np.where(rng > _EPS, 2.0 / np.maximum(rng, _EPS), 1.0)
                offset = np.where(rng > _EPS, -1.0 - scale * lo, -(hi + lo) / 2)
            else:
                scale = 1.0 / np.maximum(std, _EPS)
                offset = -mean * scale
            # min/max stay the data range in every mode; quantile mode's bounds live in scale/offset
            for name, val in dict(scale=scale, offset=offset, min=x.min(0), max=x.max(0), mean=mean, std=std).items():
                getattr(st, name).copy_(torch.as_tensor(val, dtype=torch.float32))
            st.fitted.fill_(True)
        return self

    def _get(self, key: str) -> _Stats:
        st = self.stats[key]
        if not bool(st.fitted):
            raise RuntimeError(f"normalizer for {key!r} was never fitted (call fit() or load a checkpoint)")
        return st

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        st = self._get(key)
        if st.mode == "quantile":
            return (x * st.scale + st.offset).clamp(-1.0, 1.0)
        return x if st.mode == "identity" else x * st.scale + st.offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        st = self._get(key)
        return x if st.mode == "identity" else (x - st.offset) / st.scale

    def __contains__(self, key: str) -> bool:
        return key in self.stats
