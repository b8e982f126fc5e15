"""Inverse-dynamics pretraining (Brandfonbrener et al., 2023, "Inverse Dynamics Pretraining Learns
Good Representations for Multitask Imitation").

An observation encoder φ (nets/encoder.py: MLP for state, small conv for images) is trained with an
inverse-dynamics head: MLP([φ(o_t), φ(o_{t+k})]) -> a_t, MSE on normalised actions, on demonstrations
of many tasks without task labels. Predicting the action that links two observations forces φ to keep
what the agent controls and drop what it does not. The fine-tuning policy then loads φ from this run's
checkpoint (`policy.obs_encoder.checkpoint=<run>`, frozen or fine-tuned): `policy=idm_bc`,
`policy=idm_diffusion`, or any policy with an `obs_encoder` entry.

`objective: bc` is the paper's multitask-BC pretraining baseline on the same data: a_t from φ(o_t)
alone (no future observation), so the two encoders differ only in what they were asked to predict.

It is a Policy only so that the one trainer, checkpointing and validation serve it unchanged: the
sampler's window of k+1 observation steps gives o_t (first) and o_{t+k} (last), and its first action
is a_t. It does not act (`predict_action` raises); train it with `pretrain=idm` (eval is off there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from protege.policies.base import Policy, ShapeMeta
from protege.policies.bc import mlp


class IDMPretrainer(Policy):
    def __init__(
        self,
        shape_meta: ShapeMeta,
        k: int = 1,
        objective: str = "idm",
        head_hidden_dims: Sequence[int] = (256, 256),
        obs_encoder: Mapping[str, Any] | None = None,
        normalization: Mapping[str, str] | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k={k}: the inverse-dynamics gap must be >= 1 step")
        # window = o_t .. o_{t+k} (k+1 observation steps), actions a_t .. a_{t+k}
        super().__init__(shape_meta, n_obs_steps=k + 1, horizon=k + 1, n_action_steps=1, normalization=normalization,
                         obs_encoder=dict(obs_encoder or {}))
        if objective not in ("idm", "bc"):
            raise ValueError(f"objective={objective!r}: expected 'idm' (a_t from o_t, o_t+k) or 'bc' (a_t from o_t)")
        self.k, self.objective = k, objective
        n_in = 2 if objective == "idm" else 1
        self.head = mlp(n_in * self.obs_encoder.out_dim, head_hidden_dims, self.action_dim)

    def predict_next_action(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Normalised a_t predicted from the window's first and last observations (`bc`: the first only): (B, A)."""
        steps = [0, self.k] if self.objective == "idm" else [0]
        pair = {key: obs[key][:, steps] for key in self.obs_encoder.keys}
        return self.head(self.obs_encoder.encode_window(pair, self.normalizer, len(steps)))

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = self.normalizer.normalize(self.action_key, batch[self.action_key][:, 0].float())
        err = (self.predict_next_action(batch) - target).pow(2).mean(-1)
        # windows starting before the episode repeat o_0 / a_0 (edge padding): those pairs are not
        # k steps apart, so they are left out
        valid = ~batch["action_is_pad"][:, 0] if "action_is_pad" in batch else torch.ones_like(err, dtype=torch.bool)
        return {"loss": (err * valid).sum() / valid.sum().clamp(min=1)}

    def predict_action(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(
            "IDMPretrainer learns an encoder, it does not act: fine-tune a policy on it "
            "(policy=idm_bc or idm_diffusion with policy.obs_encoder.checkpoint=<this run>)"
        )
