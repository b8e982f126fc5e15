"""ACT: Action Chunking with Transformers (Zhao et al., RSS 2023), top to bottom in one file.

Predicts a chunk of `chunk_size` future actions from the current observation:
- every camera goes through a ResNet-18 (one per camera, or shared; `backbone=conv`: the small
  group-norm conv trunk of nets/vision.py, for a CPU); its feature map is projected to `hidden_dim`
  tokens with a fixed 2-D sine position embedding;
- a transformer encoder reads [latent token, proprioception token, image tokens]; a transformer
  decoder with `chunk_size` learned queries cross-attends to it and emits the chunk (L1 loss);
- a CVAE: during training, a separate transformer encoder reads [CLS, proprioception, the true action
  chunk] and outputs the posterior over a `latent_dim` style variable z, regularised to N(0, I) with
  weight `kl_weight`; at inference z = 0 (the prior mean), so the output is deterministic.

Execution: plain chunks (`n_action_steps` open-loop actions per query) or temporal ensembling
(`temporal_ensemble=m`: query every step and average all overlapping predictions with weights
exp(-m i)); see `protege/runtime/chunking.py`, used by evaluation and the runner alike.

Decoder depth: the original code builds 7 decoder layers but returns the output of the FIRST one
(`hs = self.transformer(...)[0]` on the stacked intermediate outputs), so layers 2-7 never receive a
gradient; the paper's results come from a 1-layer decoder, which is our default. Here the LAST layer's
output is used, so every layer built is trained (tested).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protege.errors import ConfigError
from protege.policies.base import Policy, ShapeMeta
from protege.policies.export import ExportedFunction, export_function
from protege.policies.nets.vision import ImageAugment, build_trunk, resolve_backbone_norm

log = logging.getLogger("protege.policies")


def sine_table(n: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sinusoid position table (n, dim), as in 'Attention is all you need'."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return table


def sine_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """DETR's normalised 2-D sine embedding of an h x w feature map: (h*w, dim), y half then x half."""
    half = dim // 2
    dim_t = 10000.0 ** (2 * (torch.arange(half, device=device) // 2) / half)
    ys = torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + 1e-6) * 2 * math.pi
    xs = torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + 1e-6) * 2 * math.pi

    def embed(v: torch.Tensor) -> torch.Tensor:
        e = v[:, None] / dim_t
        return torch.stack([e[:, 0::2].sin(), e[:, 1::2].cos()], dim=2).flatten(1)

    ey, ex = embed(ys), embed(xs)  # (h, half), (w, half)
    return torch.cat([ey[:, None].expand(h, w, half), ex[None].expand(h, w, half)], dim=-1).flatten(0, 1)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over the steps of (B, T, D) chunks that are not padding (`is_pad` (B, T))."""
    valid = (~is_pad).unsqueeze(-1).to(pred.dtype)
    return ((pred - target).abs() * valid).sum() / (valid.sum() * pred.shape[-1]).clamp(min=1)


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters and initialisation (checkpoints load
    either way), whose softmax(QK^T)V runs in fp32 on a CPU under bf16 autocast while the projections stay
    bf16: torch's bf16 CPU flash-attention kernel (forward + backward) measured 6-9x slower than its fp32
    one at head dims 8-16 and 1.4x at 32 (torch 2.14, one thread), which made bf16 autocast 2.4x SLOWER
    than fp32 for a small ACT. nn.MultiheadAttention gives no way in between projection and attention."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ConfigError(f"act: hidden_dim {dim} must be divisible by n_heads {n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, dim) queries attend to (B, S, dim) keys/values; `key_padding_mask` (B, S): True = ignore."""
        w, b = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(x, w[i], b[i]).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
                   for i, x in enumerate((query, key, value)))
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout)
            out = out.to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TransformerLayer(nn.Module):
    """Post-norm DETR layer: position embeddings are added to queries and keys in every layer
    (torch's nn.Transformer*Layer adds nothing, hence this small layer)."""

    def __init__(self, dim: int, n_heads: int, ff: int, dropout: float, cross: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(dim, n_heads, dropout)
        self.cross_attn = Attention(dim, n_heads, dropout) if cross else None
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3 if cross else 2))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, memory: torch.Tensor | None = None,
                memory_pos: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None,
                n_out: int | None = None) -> torch.Tensor:
        """`n_out` (self-attention layers): compute only the first `n_out` output tokens, attending to all
        tokens: the values of `forward(...)[:, :n_out]` without the work on tokens nobody reads."""
        q = x + pos
        values, queries = x, q
        if n_out is not None:
            assert self.cross_attn is None, "n_out is for self-attention layers"
            x, queries = x[:, :n_out], q[:, :n_out]
        x = self.norms[0](x + self.drop(self.self_attn(queries, q, values, pad_mask)))
        if self.cross_attn is not None:
            attn = self.cross_attn(x + pos, memory + memory_pos, memory)
            x = self.norms[1](x + self.drop(attn))
        return self.norms[-1](x + self.drop(self.ff(x)))


class ACTPolicy(Policy):
    def __init__(
        self,
        shape_meta: ShapeMeta,
        chunk_size: int = 100,
        n_action_steps: int = 100,
        temporal_ensemble: float | None = None,
        hidden_dim: int = 512,
        n_heads: int = 8,
        dim_feedforward: int = 3200,
        n_encoder_layers: int = 4,
        n_decoder_layers: int = 1,
        n_vae_encoder_layers: int = 4,
        latent_dim: int = 32,
        kl_weight: float = 10.0,
        use_vae: bool = True,
        dropout: float = 0.1,
        backbone_norm: str = "auto",
        backbone_weights: str | None = None,
        backbone_lr: float | None = 1e-5,
        backbone: str = "resnet18",
        backbone_channels: tuple[int, ...] = (32, 64, 128, 128),
        backbone_strides: tuple[int, ...] = (2, 2, 2, 2),
        shared_backbone: bool = False,
        image_aug: Mapping[str, Any] | None = None,
        normalization: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(shape_meta, 1, chunk_size, n_action_steps, {"state": "gaussian", "action": "gaussian", **(normalization or {})})
        self.chunk_size, self.kl_weight, self.use_vae, self.latent_dim = chunk_size, kl_weight, use_vae, latent_dim
        self.temporal_ensemble = temporal_ensemble
        self.image_keys = [k for k in self.obs_keys if self.shape_meta[k]["kind"] == "image"]
        state_dim = self.state_feature_dim  # all non-image keys form one proprioception token
        D = self.hidden_dim = hidden_dim
        self._layer_args = (D, n_heads, dim_feedforward, dropout)
        layers = self.transformer_layers

        # --- CVAE posterior encoder q(z | proprioception, action chunk)
        if use_vae:
            self.vae_cls = nn.Embedding(1, D)
            self.vae_state_proj = nn.Linear(state_dim, D) if state_dim else None
            self.vae_action_proj = nn.Linear(self.action_dim, D)
            self.vae_encoder = layers(n_vae_encoder_layers)
            self.vae_to_latent = nn.Linear(D, 2 * latent_dim)
            self.register_buffer("vae_pos", sine_table(2 + chunk_size, D)[None], persistent=False)
        # --- observation tokens
        self.augment = ImageAugment(**(image_aug or {}))
        n_backbones = 1 if shared_backbone else len(self.image_keys)
        norm = resolve_backbone_norm(backbone_norm, backbone_weights) if self.image_keys else "group_norm"
        # ACT's small backbone lr protects pretrained features; a backbone trained from scratch by `auto`
        # gets the main lr (at 1e-5 a random-init backbone barely moves in a CPU-sized run)
        self.backbone_lr = None if backbone_norm == "auto" and not backbone_weights else backbone_lr
        self.backbones = nn.ModuleList(build_trunk(backbone, norm, backbone_weights, backbone_channels, backbone_strides)
                                       for _ in range(n_backbones))
        self.image_proj = nn.Conv2d(self.backbones[0].out_channels, D, 1) if self.image_keys else None
        self.state_proj = nn.Linear(state_dim, D) if state_dim else None
        self.latent_proj = nn.Linear(latent_dim, D)
        self.token_pos = nn.Embedding(2, D)  # learned positions of the latent and proprioception tokens
        # --- transformer
        self.encoder = layers(n_encoder_layers)
        self.decoder = layers(n_decoder_layers, cross=True)
        self.decoder_norm = nn.LayerNorm(D)
        self.queries = nn.Embedding(chunk_size, D)
        self.action_head = nn.Linear(D, self.action_dim)
        self._exported: ExportedFunction | None = None  # see accelerate()

    # ------------------------------------------------------------------ model
    def transformer_layers(self, n: int, cross: bool = False) -> nn.ModuleList:
        """`n` DETR layers of this policy's width (also used by ACT-JEPA's predictor)."""
        return nn.ModuleList(TransformerLayer(*self._layer_args, cross=cross) for _ in range(n))

    def _proprio(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return self.state_features(obs)[:, 0] if self.state_feature_dim else None

    def _posterior(self, proprio: torch.Tensor | None, actions: torch.Tensor, is_pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = actions.shape[0]
        tokens = [self.vae_cls.weight.expand(B, 1, -1)]
        pad = [is_pad.new_zeros(B, 1)]
        if self.vae_state_proj is not None:
            tokens.append(self.vae_state_proj(proprio)[:, None])
            pad.append(is_pad.new_zeros(B, 1))
        tokens.append(self.vae_action_proj(actions))
        x, pad_mask = torch.cat(tokens, 1), torch.cat([*pad, is_pad], 1)
        pos = self.vae_pos[:, : x.shape[1]]
        for i, layer in enumerate(self.vae_encoder):
            # only the CLS token's output is read: the last layer computes that one token (exact, and
            # ~1/4 of the CVAE encoder's work at chunk 100 saved)
            x = layer(x, pos, pad_mask=pad_mask, n_out=1 if i == len(self.vae_encoder) - 1 else None)
        mu, logvar = self.vae_to_latent(x[:, 0]).chunk(2, dim=-1)
        return mu, logvar

    def _encode(self, obs: Mapping[str, torch.Tensor], proprio: torch.Tensor | None,
                z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context encoder: memory tokens [latent, proprioception, image tokens] and their positions."""
        B = z.shape[0]
        tokens, pos = [self.latent_proj(z)[:, None]], [self.token_pos.weight[None, :1].expand(B, -1, -1)]
        if proprio is not None:
            tokens.append(self.state_proj(proprio)[:, None])
            pos.append(self.token_pos.weight[None, 1:].expand(B, -1, -1))
        for i, k in enumerate(self.image_keys):
            feat = self.backbones[0 if len(self.backbones) == 1 else i](self.augment(obs[k][:, 0]))
            feat = self.image_proj(feat)  # (B, D, h, w)
            tokens.append(feat.flatten(2).transpose(1, 2))
            pos.append(sine_2d(feat.shape[2], feat.shape[3], feat.shape[1], feat.device)[None].expand(B, -1, -1).to(feat.dtype))
        memory, memory_pos = torch.cat(tokens, 1), torch.cat(pos, 1)
        for layer in self.encoder:
            memory = layer(memory, memory_pos)
        return memory, memory_pos

    def _decode(self, memory: torch.Tensor, memory_pos: torch.Tensor) -> torch.Tensor:
        B = memory.shape[0]
        query_pos = self.queries.weight[None].expand(B, -1, -1)
        x = torch.zeros_like(query_pos)
        for layer in self.decoder:
            x = layer(x, query_pos, memory, memory_pos)
        return self.action_head(self.decoder_norm(x))  # (B, chunk, A), normalised

    # ------------------------------------------------------------------ Policy
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.action_loss(batch)[0]

    def action_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """ACT's loss (L1 + kl_weight * KL), plus what ACT-JEPA builds on: the encoder memory, its
        positions and the chunk's padding mask."""
        actions = self.normalizer.normalize(self.action_key, batch[self.action_key].float())
        is_pad = batch["action_is_pad"].bool() if "action_is_pad" in batch else torch.zeros(actions.shape[:2], dtype=torch.bool, device=actions.device)
        proprio = self._proprio(batch)
        B = actions.shape[0]
        if self.use_vae:
            mu, logvar = self._posterior(proprio, actions, is_pad)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(-1).mean()
        else:
            z, kl = actions.new_zeros(B, self.latent_dim), actions.new_zeros(())
        memory, memory_pos = self._encode(batch, proprio, z)
        pred = self._decode(memory, memory_pos)
        l1 = masked_l1(pred, actions, is_pad)
        return {"loss": l1 + self.kl_weight * kl, "l1": l1.detach(), "kl": kl.detach()}, memory, memory_pos, is_pad

    @torch.no_grad()
    def predict_action(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self._exported is not None and not self.training and self.device.type == "cpu":
            return self._exported(*(obs[k][:, -1:] for k in self.obs_keys)).to(self.queries.weight.dtype)
        return self._predict(obs)

    def _predict(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        proprio = self._proprio(obs)
        B = next(iter(obs.values())).shape[0]
        z = torch.zeros(B, self.latent_dim, device=self.device)  # the prior's mean: deterministic output
        return self.action_slice(self.normalizer.unnormalize(self.action_key, self._decode(*self._encode(obs, proprio, z))))

    def accelerate(self, cache_dir: str | Path, runtime: str = "auto") -> str:
        """Run `predict_action` (backbone, encoder, decoder, normalisation: one graph) through an exported
        artefact (`policies/export.py`, ONNX Runtime by default) cached in `cache_dir`. At batch 1 on a CPU
        eager PyTorch spends much of an ACT chunk dispatching small ops and re-laying-out conv weights;
        the runtime fuses and pre-packs them. CPU, state and camera observations only; returns the
        runtime in use (`eager` when nothing was exported)."""
        self._exported = None
        if runtime == "eager":
            return "eager"
        if self.device.type != "cpu" or any(self.shape_meta[k]["kind"] not in ("state", "image") for k in self.obs_keys):
            log.info("act on %s with obs %s: no export (CPU, state and image keys only); running eager PyTorch",
                     self.device, self.obs_keys)
            return "eager"
        # float examples (images too: the runtime is fed float32, the graph scales by 1/255 itself)
        example = tuple(torch.rand(2, 1, *self.shape_meta[k]["shape"]) * (255 if self.shape_meta[k]["kind"] == "image" else 1)
                        for k in self.obs_keys)
        settings = {"obs_keys": self.obs_keys, "shapes": [list(e.shape[1:]) for e in example], "n_action_steps": self.n_action_steps}
        was_training = self.training
        self.eval()
        try:
            fn = export_function(_ACTInference(self), example, [k.replace("/", "_") for k in self.obs_keys], cache_dir,
                                 f"act-{self.chunk_size}", runtime, settings)
        finally:
            self.train(was_training)
        if fn is None:
            return "eager"
        self._exported = fn
        return fn.runtime

    def optim_groups(self, lr: float) -> list[dict[str, Any]]:
        """The backbones train at `backbone_lr` (ACT: 1e-5), everything else at `lr`."""
        backbone = {id(p) for p in self.backbones.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone]
        groups = [{"params": rest, "lr": lr}]
        if backbone:
            groups.append({"params": [p for p in self.backbones.parameters() if p.requires_grad],
                           "lr": lr if self.backbone_lr is None else self.backbone_lr})
        return groups


class _ACTInference(nn.Module):
    """`ACTPolicy.predict_action` on positional observation tensors (in `obs_keys` order): the module
    `accelerate` exports."""

    def __init__(self, policy: ACTPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, *obs: torch.Tensor) -> torch.Tensor:
        return self.policy._predict(dict(zip(self.policy.obs_keys, obs)))
