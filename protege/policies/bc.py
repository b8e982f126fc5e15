"""Behaviour cloning: an MLP maps the observation window to an action chunk, trained with MSE.

The simplest baseline. With multimodal demonstrations MSE regresses to the mean of the modes
(e.g. straight into an obstacle that the experts go around on either side), which is exactly what
Diffusion Policy fixes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protege.policies.base import Policy, ShapeMeta


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.Mish(), nn.Dropout(dropout)] if dropout else [nn.Linear(in_dim, h), nn.Mish()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class BCPolicy(Policy):
    def __init__(
        self,
        shape_meta: ShapeMeta,
        n_obs_steps: int = 2,
        horizon: int = 16,
        n_action_steps: int = 8,
        hidden_dims: Sequence[int] = (256, 256, 256),
        dropout: float = 0.0,
        normalization: Mapping[str, str] | None = None,
        obs_encoder: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(shape_meta, n_obs_steps, horizon, n_action_steps, normalization, obs_encoder=obs_encoder)
        self.net = mlp(self.obs_feature_dim * n_obs_steps, hidden_dims, horizon * self.action_dim, dropout)

    def _forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.net(self.low_dim_obs(obs)).view(-1, self.horizon, self.action_dim)

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = self.normalizer.normalize(self.action_key, batch[self.action_key].float())
        return {"loss": F.mse_loss(self._forward(batch), target)}

    @torch.no_grad()
    def predict_action(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        actions = self.normalizer.unnormalize(self.action_key, self._forward(obs))
        return self.action_slice(actions)
