"""ACT-JEPA (Vujinovic & Kovacevic, 2025): ACT plus a JEPA objective on future proprioception.

ACT (see act.py) predicts a chunk of actions from the current observation. ACT-JEPA trains the same
context encoder to also predict, in latent space, the chunk of *future* proprioceptive states:
- context encoder: ACT's transformer encoder over [latent, proprioception, image tokens];
- target encoder: an EMA copy (momentum `target_momentum`, no gradient) of the context encoder's
  proprioception projection and transformer layers, run over the future chunk of proprioceptive
  states (one token per step, fixed sine positions); its outputs are layer-normalised (as in I-JEPA);
- predictor: `chunk_size` learned queries cross-attending to the context memory (DETR layers), which
  predict the target latents;
- loss = action L1 (+ KL if the CVAE is on) + `jepa_weight` * L1(predicted, target latents) over
  the unpadded steps.
At inference only the context encoder and action decoder run, so latency and the runtime path are ACT's.

The CVAE is off by default (`use_vae: false`): the paper's model has a context encoder, a target
encoder, a predictor and an action decoder, and a posterior z computed from the true action chunk
would leak the future into the memory the predictor reads.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protege.errors import ConfigError
from protege.policies.act import ACTPolicy, masked_l1, sine_table
from protege.policies.base import ShapeMeta


class ACTJEPAPolicy(ACTPolicy):
    def __init__(
        self,
        shape_meta: ShapeMeta,
        jepa_weight: float = 1.0,
        target_momentum: float = 0.99,
        n_predictor_layers: int = 1,
        use_vae: bool = False,
        **act_kwargs: Any,
    ) -> None:
        super().__init__(shape_meta, use_vae=use_vae, **act_kwargs)
        if not self.state_feature_dim:
            raise ConfigError("ACT-JEPA predicts future proprioception, but the policy has no state observation key "
                              f"(obs keys: {self.obs_keys})")
        if not 0.0 <= target_momentum <= 1.0:
            raise ConfigError(f"policy.target_momentum must be in [0, 1], got {target_momentum}")
        self.jepa_weight, self.target_momentum = jepa_weight, target_momentum
        # the sampler gathers these over the whole chunk: the future the target encoder reads
        self.horizon_obs_keys = tuple(k for k in self.obs_keys if self.shape_meta[k]["kind"] != "image")
        self.predictor = self.transformer_layers(n_predictor_layers, cross=True)
        self.predictor_queries = nn.Embedding(self.chunk_size, self.hidden_dim)
        self.predictor_head = nn.Linear(self.hidden_dim, self.hidden_dim)
        self.target_encoder = copy.deepcopy(self._context_modules()).requires_grad_(False)
        self.register_buffer("target_pos", sine_table(self.chunk_size, self.hidden_dim)[None], persistent=False)

    def _context_modules(self) -> nn.ModuleDict:
        """The part of the context encoder the target encoder mirrors (same parameter order)."""
        return nn.ModuleDict({"state_proj": self.state_proj, "encoder": self.encoder})

    def train(self, mode: bool = True) -> ACTJEPAPolicy:
        super().train(mode)
        self.target_encoder.eval()  # targets without dropout noise
        return self

    @torch.no_grad()
    def targets(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Target latents of the future proprioceptive chunk, (B, chunk_size, hidden_dim)."""
        x = self.target_encoder["state_proj"](self.state_features(batch, steps=self.chunk_size))
        for layer in self.target_encoder["encoder"]:
            x = layer(x, self.target_pos[:, : x.shape[1]])
        return F.layer_norm(x, x.shape[-1:])

    def predict_latents(self, memory: torch.Tensor, memory_pos: torch.Tensor) -> torch.Tensor:
        query_pos = self.predictor_queries.weight[None].expand(memory.shape[0], -1, -1)
        x = torch.zeros_like(query_pos)
        for layer in self.predictor:
            x = layer(x, query_pos, memory, memory_pos)
        return self.predictor_head(x)

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, memory, memory_pos, is_pad = self.action_loss(batch)
        target = self.targets(batch)
        if target.shape[1] != self.chunk_size:
            raise ValueError(f"ACT-JEPA needs the future proprioception over the chunk ({self.chunk_size} steps) in the "
                             f"batch, got {target.shape[1]}: build the sampler with horizon_obs_keys={list(self.horizon_obs_keys)}")
        pred = self.predict_latents(memory, memory_pos)
        latent = masked_l1(pred, target, is_pad)
        out["loss"] = out["loss"] + self.jepa_weight * latent
        out["latent"] = latent.detach()
        return out

    @torch.no_grad()
    def on_train_step(self) -> None:
        """target <- m * target + (1 - m) * context, after every optimizer step."""
        for t, c in zip(self.target_encoder.parameters(), self._context_modules().parameters(), strict=True):
            t.lerp_(c, 1.0 - self.target_momentum)
