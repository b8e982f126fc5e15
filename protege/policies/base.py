"""The one policy interface every method implements, and the shape metadata it is built from.

A policy is an `nn.Module` that owns its `Normalizer`, so a checkpoint is self-contained:
- `compute_loss(batch) -> {"loss": ..., other scalars}` on a raw (unnormalised) batch from the sampler;
- `predict_action(obs) -> (B, n_action_steps, A)` unnormalised actions to execute from the current
  step, given raw observations `{key: (B, n_obs_steps, ...)}`;
- `reset()` clears any per-episode state;
- `on_train_step()` runs after every optimizer step (e.g. ACT-JEPA's EMA target encoder);
- `accelerate(cache_dir, runtime)` compiles inference with an exported runtime (Diffusion Policy's DDIM loop);
- `horizon_obs_keys`: observation keys the sampler gathers over the whole `horizon` instead of the
  first `n_obs_steps` steps, for policies that learn from future observations (ACT-JEPA).

Policies are built from config with hydra `_target_` (see `protege/configs/policy/*.yaml`):
`hydra.utils.instantiate(cfg.policy, shape_meta=shape_meta)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protege import CONFIG_DIR  # noqa: F401 - re-exported: callers import it from here
from protege.datasets.normalizer import Normalizer


# shape_meta: {key: {"shape": [...], "kind": "state"|"action"|"image"|...}}, from the replay buffer;
# a "language" key (`task`, int indices) also carries "tasks": the instruction strings of attrs["tasks"].
ShapeMeta = Mapping[str, Mapping[str, Any]]


def shape_meta_from_buffer(buffer: Any, obs_keys: list[str], action_key: str = "action") -> dict[str, dict]:
    meta = {}
    for key in [*obs_keys, action_key]:
        arr = buffer[key]
        meta[key] = {"shape": list(arr.shape[1:]), "kind": buffer.kinds.get(key, "state")}
        if meta[key]["kind"] == "language":  # the strings its int indices name (LeRobot's convention)
            meta[key]["tasks"] = [str(t) for t in buffer.attrs.get("tasks", [])]
    meta[action_key]["kind"] = "action"
    return meta


class Policy(nn.Module):
    """Base class: window sizes, normalizer and helpers shared by every policy."""

    horizon_obs_keys: tuple[str, ...] = ()
    # True when predict_action(obs, guide=ChunkGuide) samples with real-time-chunking guidance (policies/guidance.py)
    supports_guide: bool = False

    def __init__(
        self,
        shape_meta: ShapeMeta,
        n_obs_steps: int,
        horizon: int,
        n_action_steps: int,
        normalization: Mapping[str, str] | None = None,
        obs_encoder: Mapping[str, Any] | None = None,
    ) -> None:
        """`obs_encoder`: put a learned per-step encoder φ (nets/encoder.py) in front of the head:
        {hidden_dims, out_dim, conv_channels, checkpoint (init from a run, e.g. IDM pretraining), freeze}."""
        super().__init__()
        if not 1 <= n_action_steps <= horizon - n_obs_steps + 1:
            raise ValueError(
                f"n_action_steps={n_action_steps} must be in [1, horizon - n_obs_steps + 1 = {horizon - n_obs_steps + 1}]"
            )
        self.shape_meta = {k: dict(v) for k, v in shape_meta.items()}
        self.n_obs_steps, self.horizon, self.n_action_steps = n_obs_steps, horizon, n_action_steps
        self.obs_keys = [k for k, v in self.shape_meta.items() if v["kind"] != "action"]
        self.action_key = next(k for k, v in self.shape_meta.items() if v["kind"] == "action")
        self.action_dim = int(self.shape_meta[self.action_key]["shape"][0])
        modes = {"state": "minmax", "action": "minmax", "image": "identity", "language": "identity"}
        modes.update(normalization or {})
        self.normalizer = Normalizer(
            {k: (tuple(v["shape"]) if v["kind"] != "image" else (), modes[v["kind"]]) for k, v in self.shape_meta.items()}
        )
        self.obs_encoder = None
        if obs_encoder is not None:
            from protege.policies.nets.encoder import build_obs_encoder

            self.obs_encoder = build_obs_encoder(self.shape_meta, self.obs_keys, **obs_encoder)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`forward` is the loss, so DistributedDataParallel's gradient hooks see the training call."""
        return self.compute_loss(batch)

    def predict_action(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Clear per-episode state (none by default: policies here are stateless between chunks)."""

    def on_train_step(self) -> None:
        """Called by the trainer after each optimizer step (nothing by default)."""

    def accelerate(self, cache_dir: str | Path, runtime: str = "auto") -> str:
        """Compile the inference path with an inference runtime (`policies/export.py`), caching the
        artefact in `cache_dir`; returns the runtime in use. Nothing to compile by default."""
        return "eager"

    def optim_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; override for per-module learning rates (e.g. ACT's backbone)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    # helpers -----------------------------------------------------------------
    def state_features(self, obs: Mapping[str, torch.Tensor], steps: int | None = None) -> torch.Tensor:
        """Per-step features of every non-image key of the window, (B, steps, state_feature_dim):
        normalised states, and language keys (task indices) as one-hots. Cameras go through an encoder.
        `steps` defaults to `n_obs_steps` (more needs the keys in `horizon_obs_keys`)."""
        steps = self.n_obs_steps if steps is None else steps
        parts = [self._task_one_hot(k, obs[k][:, :steps]) if self.shape_meta[k]["kind"] == "language"
                 else self.normalizer.normalize(k, obs[k][:, :steps].float()).flatten(2)
                 for k in self.obs_keys if self.shape_meta[k]["kind"] != "image"]
        if not parts:
            B = next(iter(obs.values())).shape[0]
            return torch.zeros(B, steps, 0, device=self.device)
        return torch.cat(parts, dim=-1)

    def low_dim_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`state_features` flattened over the window, (B, n_obs_steps * D), for state-only policies;
        with an `obs_encoder` (e.g. IDM-pretrained), φ of each step instead."""
        if self.obs_encoder is not None:
            return self.obs_encoder.encode_window(obs, self.normalizer, self.n_obs_steps)
        self.obs_feature_dim  # noqa: B018 - raises a clear error if the policy was given cameras
        return self.state_features(obs).flatten(1)

    def _task_one_hot(self, key: str, idx: torch.Tensor) -> torch.Tensor:
        """A language key (task index) as a one-hot over its instructions: multi-task conditioning for
        policies that do not read text."""
        return torch.nn.functional.one_hot(idx.long(), max(1, len(self.shape_meta[key].get("tasks", [])))).float()

    @property
    def state_feature_dim(self) -> int:
        """Per-step size of `state_features` (image keys excluded)."""
        dims = [max(1, len(m.get("tasks", []))) if m["kind"] == "language" else int(torch.Size(m["shape"]).numel())
                for m in (self.shape_meta[k] for k in self.obs_keys) if m["kind"] != "image"]
        return sum(dims)

    @property
    def obs_feature_dim(self) -> int:
        """Per-step feature size of `low_dim_obs`, for policies without an image encoder."""
        if self.obs_encoder is not None:
            return self.obs_encoder.out_dim
        for k in self.obs_keys:
            if self.shape_meta[k]["kind"] == "image":
                raise ValueError(f"{type(self).__name__} takes state observations only; {k!r} is an image key")
        return self.state_feature_dim

    def action_slice(self, actions: torch.Tensor) -> torch.Tensor:
        """The executable chunk of a predicted horizon: from the current step, n_action_steps long."""
        start = self.n_obs_steps - 1
        return actions[:, start : start + self.n_action_steps]

    def guide_tensors(self, guide: Any, batch: int, length: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A `ChunkGuide` in the sampler's space: normalised targets y (B, length, A) and weights
        w (1, length, 1) over the sampled sequence, whose position `offset` is the chunk's first action."""
        target = torch.as_tensor(guide.target, dtype=torch.float32, device=self.device)
        target = target.expand(batch, *target.shape) if target.ndim == 2 else target
        n = max(0, min(target.shape[1], length - offset))
        y = torch.zeros(batch, length, self.action_dim, device=self.device)
        w = torch.zeros(1, length, 1, device=self.device)
        y[:, offset : offset + n] = self.normalizer.normalize(self.action_key, target[:, :n])
        w[0, offset : offset + n, 0] = torch.as_tensor(guide.weights, dtype=torch.float32, device=self.device)[:n]
        return y, w

    def keep_frozen(self, actions: torch.Tensor, guide: Any) -> torch.Tensor:
        """The chunk with the guide's frozen actions copied in exactly: the robot executes those
        (they come from the previous chunk) whatever the sampler made of them."""
        target = torch.as_tensor(guide.target, dtype=actions.dtype, device=actions.device)
        target = target.expand(actions.shape[0], *target.shape) if target.ndim == 2 else target
        f = min(guide.frozen, actions.shape[1], target.shape[1])
        out = actions.clone()
        out[:, :f] = target[:, :f]
        return out


def build_policy(policy_cfg: Any, shape_meta: ShapeMeta) -> Policy:
    """Instantiate a policy from its config group entry (`_target_` + kwargs; `name` is a label)."""
    import hydra.utils
    from hydra.errors import InstantiationException
    from omegaconf import DictConfig, OmegaConf

    from protege.errors import ConfigError

    cfg = OmegaConf.to_container(policy_cfg, resolve=True) if isinstance(policy_cfg, DictConfig) else dict(policy_cfg)
    cfg.pop("name", None)
    try:
        policy = hydra.utils.instantiate(cfg, shape_meta=shape_meta, _convert_="all")
    except InstantiationException as e:  # unwrap hydra's wrapper: the cause is the useful message
        raise ConfigError(f"policy {cfg.get('_target_')}: {e.__cause__ or e}") from e
    if not isinstance(policy, Policy):
        raise TypeError(f"{cfg.get('_target_')} built a {type(policy).__name__}, expected a protege Policy")
    return policy


def load_policy(ckpt_dir: str | Path, cfg: Any = None, device: str | torch.device = "cpu", runtime: str = "eager") -> Policy:
    """Rebuild the policy a checkpoint was trained as (its saved config, or `cfg`) and load its weights
    and normalizer strictly; in eval mode on `device`. `runtime` (auto|onnx|aoti|eager): compile its
    inference (`Policy.accelerate`), the artefact cached in `<ckpt_dir>/export/`.

    A policy built on a pretrained encoder (`obs_encoder.checkpoint`) is built from this checkpoint's
    own encoder instead: the weights come from here anyway, and the pretraining run may be gone."""
    from omegaconf import OmegaConf

    from protege.fileio import load_config, read_weights, resolve_checkpoint

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    cfg = load_config(ckpt_dir) if cfg is None else cfg
    policy_cfg = cfg.policy
    encoder = policy_cfg.get("obs_encoder")
    if encoder is not None and encoder.get("checkpoint"):
        policy_cfg = OmegaConf.merge(policy_cfg, {"obs_encoder": {"checkpoint": str(ckpt_dir)}})
    policy = build_policy(policy_cfg, OmegaConf.to_container(cfg.shape_meta))
    policy.load_state_dict(read_weights(ckpt_dir), strict=True)
    policy = policy.to(device).eval()
    policy.accelerate(ckpt_dir / "export", runtime)
    return policy

