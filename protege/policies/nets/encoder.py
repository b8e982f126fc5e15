"""Observation encoder φ (one time step -> feature vector) that any policy can put in front of its head,
and loading φ from another run's checkpoint (e.g. inverse-dynamics pretraining, policies/idm.py).

State keys are concatenated and go through an MLP; each image key through a small conv net
(uint8 HWC -> [0, 1] CHW, 4 strided convs + global average pool), whose features join the MLP input.

A pretrained encoder keeps the input statistics it was trained with (`input_norm`): the fine-tuning
policy's own normalizer is fitted on its few new demos, whose ranges differ from the pretraining
mixture, and φ must see inputs scaled as during pretraining. An encoder without loaded statistics
normalises with the policy's normalizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protege.datasets.normalizer import Normalizer
from protege.errors import DataError
from protege.fileio import load_config, read_weights, resolve_checkpoint


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.Mish()]
        in_dim = h
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


def _conv_net(in_ch: int, channels: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(in_ch, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.Mish()]
        in_ch = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ObsEncoder(nn.Module):
    def __init__(
        self,
        shape_meta: Mapping[str, Mapping[str, Any]],
        obs_keys: Sequence[str],
        hidden_dims: Sequence[int] = (256, 256),
        out_dim: int = 64,
        conv_channels: Sequence[int] = (32, 64, 64, 64),
    ) -> None:
        super().__init__()
        self.keys = list(obs_keys)
        self.shapes = {k: tuple(shape_meta[k]["shape"]) for k in self.keys}
        self.image_keys = [k for k in self.keys if shape_meta[k]["kind"] == "image"]
        self.state_keys = [k for k in self.keys if k not in self.image_keys]
        state_dim = sum(int(torch.Size(self.shapes[k]).numel()) for k in self.state_keys)
        self.convs = nn.ModuleDict({k: _conv_net(self.shapes[k][-1], conv_channels) for k in self.image_keys})
        self.mlp = _mlp(state_dim + len(self.image_keys) * (conv_channels[-1] if conv_channels else 0), hidden_dims, out_dim)
        self.out_dim = out_dim
        self.input_norm = Normalizer({k: (self.shapes[k], "minmax") for k in self.state_keys})

    def forward(self, obs: Mapping[str, torch.Tensor], normalizer: Normalizer) -> torch.Tensor:
        """obs {key: (N, *shape)} raw -> (N, out_dim). State keys are normalised with `input_norm`
        when it holds pretrained statistics, else with `normalizer` (the policy's)."""
        parts = []
        for k in self.state_keys:
            norm = self.input_norm if bool(self.input_norm.stats[k].fitted) else normalizer
            parts.append(norm.normalize(k, obs[k].float()).flatten(1))
        for k in self.image_keys:
            parts.append(self.convs[k](obs[k].permute(0, 3, 1, 2).float() / 255.0))
        return self.mlp(torch.cat(parts, dim=-1))

    def encode_window(self, obs: Mapping[str, torch.Tensor], normalizer: Normalizer, n_steps: int) -> torch.Tensor:
        """{key: (B, >=n_steps, ...)} -> (B, n_steps * out_dim): φ of each of the first n_steps steps."""
        B = obs[self.keys[0]].shape[0]
        flat = {k: obs[k][:, :n_steps].reshape(B * n_steps, *obs[k].shape[2:]) for k in self.keys}
        return self(flat, normalizer).view(B, n_steps * self.out_dim)


def load_pretrained_encoder(encoder: ObsEncoder, checkpoint: str | Path) -> None:
    """Copy φ (and its input statistics) from any checkpoint whose policy has an `obs_encoder`.

    Raises DataError naming the checkpoint, the key, and the expected vs found shape when the source
    was trained on different observations or with a different encoder architecture."""
    from omegaconf import OmegaConf

    ckpt = resolve_checkpoint(checkpoint)
    cfg = load_config(ckpt)
    src = read_weights(ckpt)
    src_enc = {k.removeprefix("obs_encoder."): v for k, v in src.items() if k.startswith("obs_encoder.")}
    if not src_enc:
        raise DataError(ckpt, "obs_encoder", "a checkpoint whose policy has an observation encoder (obs_encoder.*)",
                        f"none in policy {cfg.policy.get('name', cfg.policy.get('_target_'))!r}")
    src_meta = OmegaConf.to_container(cfg.shape_meta)
    for k in encoder.keys:  # observations first: the most likely mismatch and the clearest message
        if k not in src_meta:
            raise DataError(ckpt, k, f"observation {k!r} (the fine-tuning task's)", f"an encoder over {sorted(src_meta)}")
        if tuple(src_meta[k]["shape"]) != encoder.shapes[k]:
            raise DataError(ckpt, k, f"observation shape {list(encoder.shapes[k])}", f"{src_meta[k]['shape']} in the pretrained encoder")
    target = encoder.state_dict()
    weights = {k: v for k, v in src_enc.items() if not k.startswith("input_norm.")}
    for k, v in target.items():
        if k.startswith("input_norm."):
            continue
        if k not in weights:
            raise DataError(ckpt, f"obs_encoder.{k}", "this parameter (same encoder architecture)", "it missing")
        if tuple(weights[k].shape) != tuple(v.shape):
            raise DataError(ckpt, f"obs_encoder.{k}", f"shape {list(v.shape)} (policy.obs_encoder settings)",
                            f"{list(weights[k].shape)}: the encoder was pretrained with other hidden_dims/out_dim/conv_channels")
    extra = sorted(set(weights) - set(target))
    if extra:
        raise DataError(ckpt, f"obs_encoder.{extra[0]}", "no such parameter (same encoder architecture)", "it present")
    # input statistics: the source encoder's own when it had them, else its policy's normalizer
    for k in encoder.state_keys:
        own = src_enc.get(f"input_norm.stats.{k}.fitted")
        prefix = f"input_norm.stats.{k}." if own is not None and bool(own) else f"normalizer.stats.{k}."
        table = src_enc if prefix.startswith("input_norm") else src
        for name in ("scale", "offset", "min", "max", "mean", "std"):
            weights[f"input_norm.stats.{k}.{name}"] = table[prefix + name]
        weights[f"input_norm.stats.{k}.fitted"] = torch.tensor(True)
    encoder.load_state_dict(weights, strict=True)


def build_obs_encoder(shape_meta: Mapping[str, Mapping[str, Any]], obs_keys: Sequence[str], checkpoint: str | None = None,
                      freeze: bool = False, **arch: Any) -> ObsEncoder:
    """An ObsEncoder; with `checkpoint`, initialised from that run's encoder (`freeze`: no gradient)."""
    encoder = ObsEncoder(shape_meta, obs_keys, **arch)
    if checkpoint:
        load_pretrained_encoder(encoder, checkpoint)
    if freeze:
        if not checkpoint:
            raise ValueError("obs_encoder.freeze=true needs obs_encoder.checkpoint (a frozen random encoder learns nothing)")
        encoder.requires_grad_(False)
    return encoder
