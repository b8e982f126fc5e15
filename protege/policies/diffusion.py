"""Diffusion Policy (Chi et al., RSS 2023), CNN variant, on state and/or camera observations.

Training: normalise the action window to [-1, 1], add noise at a random diffusion step with the
diffusers `DDPMScheduler`, and regress the noise with a 1-D U-Net conditioned (FiLM) on the
flattened observation window (state keys, plus one ResNet-18 feature vector per camera and step
when the task has images: `image` configures those encoders, see `nets/vision.py`). Inference: start from Gaussian noise and denoise with DDPM or DDIM
(`inference_scheduler`, `num_inference_steps`), then execute `n_action_steps` of the horizon.
Sampling from the learned distribution (rather than regressing its mean) lets it commit to one
mode of multimodal demonstrations.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from diffusers import DDIMScheduler, DDPMScheduler

from protege.policies.base import Policy, ShapeMeta
from protege.policies.export import ExportedFunction, export_function
from protege.policies.guidance import ChunkGuide, guided_eps, guided_step
from protege.policies.nets.unet1d import ConditionalUnet1D
from protege.policies.nets.vision import CameraEncoders

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
log = logging.getLogger("protege.policies")


class DiffusionPolicy(Policy):
    supports_guide = True
    def __init__(
        self,
        shape_meta: ShapeMeta,
        n_obs_steps: int = 2,
        horizon: int = 16,
        n_action_steps: int = 8,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        step_embed_dim: int = 128,
        num_train_timesteps: int = 100,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: str = "epsilon",
        inference_scheduler: str = "ddim",
        num_inference_steps: int = 10,
        normalization: Mapping[str, str] | None = None,
        image: Mapping[str, Any] | None = None,
        obs_encoder: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(shape_meta, n_obs_steps, horizon, n_action_steps, normalization, obs_encoder=obs_encoder)
        # cameras: one ResNet-18 each, unless a (pretrained) obs_encoder φ already reads every key
        self.image_encoders = CameraEncoders(self.shape_meta, self.obs_keys if self.obs_encoder is None else [], image)
        if inference_scheduler not in SCHEDULERS:
            raise ValueError(f"inference_scheduler={inference_scheduler!r}: expected one of {sorted(SCHEDULERS)}")
        self.unet = ConditionalUnet1D(
            self.action_dim, self.cond_dim_per_step * n_obs_steps, down_dims, kernel_size, n_groups, step_embed_dim
        )
        sched_kwargs = dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            clip_sample=True,  # actions live in [-1, 1] after minmax normalisation
        )
        self.noise_scheduler = DDPMScheduler(**sched_kwargs)
        self.inference_scheduler = SCHEDULERS[inference_scheduler](**sched_kwargs)
        self.num_inference_steps = num_inference_steps
        self._exported: tuple[list[int], ExportedFunction] | None = None  # (timesteps, artefact), see accelerate()

    @property
    def cond_dim_per_step(self) -> int:
        return self.obs_feature_dim if self.obs_encoder is not None else self.state_feature_dim + self.image_encoders.dim

    def condition(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The U-Net's global condition: state and camera features of every observation step, flattened."""
        if self.obs_encoder is not None:
            return self.low_dim_obs(obs)
        feats = self.state_features(obs)
        if self.image_encoders.cameras:
            feats = torch.cat([feats, self.image_encoders(obs, self.n_obs_steps)], dim=-1)
        return feats.flatten(1)

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        actions = self.normalizer.normalize(self.action_key, batch[self.action_key].float())
        cond = self.condition(batch)
        noise = torch.randn_like(actions)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (actions.shape[0],), device=actions.device)
        noisy = self.noise_scheduler.add_noise(actions, noise, t)
        pred = self.unet(noisy, t, cond)
        target = noise if self.noise_scheduler.config.prediction_type == "epsilon" else actions
        return {"loss": F.mse_loss(pred, target)}

    @torch.no_grad()
    def predict_action(self, obs: Mapping[str, torch.Tensor], guide: ChunkGuide | None = None) -> torch.Tensor:
        """`guide`: real-time chunking (`policies/guidance.py`): sample the chunk inpainting the
        previous chunk's remaining actions (guided DDIM, eager PyTorch)."""
        cond = self.condition(obs)
        B = cond.shape[0]
        noise = torch.randn(B, self.horizon, self.action_dim, device=cond.device, dtype=cond.dtype)
        inpaint = None if guide is None else (*self.guide_tensors(guide, B, self.horizon, self.n_obs_steps - 1), guide.max_weight)
        x = self.denoise(noise, cond, inpaint=inpaint)
        actions = self.action_slice(self.normalizer.unnormalize(self.action_key, x))
        return actions if guide is None else self.keep_frozen(actions, guide)

    def denoise(self, x: torch.Tensor, cond: torch.Tensor, timesteps: Sequence[int] | None = None,
                inpaint: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
        """The sampling loop: Gaussian noise (B, T, A) + condition (B, G) -> normalised actions (B, T, A).

        `timesteps` (default: the inference scheduler's) are Python ints, so the scheduler's branches
        on them are fixed when the loop is traced for export (`policies/export.py`). `inpaint`
        (targets y, weights w, β) guides every step toward y (`guidance.guided_eps`)."""
        sched = self.inference_scheduler
        if timesteps is None:
            timesteps = self.inference_timesteps()
            if inpaint is None and self._exported is not None and self._exported[0] == timesteps and x.device.type == "cpu":
                return self._exported[1](x, cond).to(x.dtype)
        films = self.unet.films_per_step(torch.tensor(timesteps, device=cond.device), cond)  # all steps in one pass
        for k, t in enumerate(timesteps):
            net = lambda xk, k=k: self.unet(xk, None, cond, films=films[k])  # noqa: E731
            if inpaint is None:
                x = sched.step(net(x), t, x).prev_sample
            else:
                x = guided_step(sched, guided_eps(net, x, float(sched.alphas_cumprod[t]), *inpaint), t, x)
        return x

    def accelerate(self, cache_dir: str | Path, runtime: str = "auto") -> str:
        """Run `denoise` through an exported artefact (`policies/export.py`) cached in `cache_dir`.
        DDIM only: DDPM draws fresh noise inside every step, which an exported graph would freeze.
        Returns the runtime in use."""
        self._exported = None
        name = f"diffusion-{type(self.inference_scheduler).__name__}-{self.num_inference_steps}"
        if runtime == "eager":
            return "eager"
        if not isinstance(self.inference_scheduler, DDIMScheduler) or self.device.type != "cpu":
            log.info("%s on %s: no export (DDIM on CPU only); running eager PyTorch", name, self.device)
            return "eager"
        timesteps = self.inference_timesteps()
        example = (torch.randn(2, self.horizon, self.action_dim), torch.randn(2, self.cond_dim_per_step * self.n_obs_steps))
        settings = {"scheduler": dict(self.inference_scheduler.config), "timesteps": timesteps,
                    "shapes": [list(e.shape[1:]) for e in example]}
        fn = export_function(_Denoiser(self, timesteps), example, ["noise", "cond"], cache_dir, name, runtime, settings)
        if fn is None:
            return "eager"
        self._exported = (timesteps, fn)
        return fn.runtime

    def inference_timesteps(self) -> list[int]:
        self.inference_scheduler.set_timesteps(self.num_inference_steps)
        return [int(t) for t in self.inference_scheduler.timesteps]


class _Denoiser(nn.Module):
    """`DiffusionPolicy.denoise` with its timesteps fixed: the module `accelerate` exports."""

    def __init__(self, policy: DiffusionPolicy, timesteps: list[int]) -> None:
        super().__init__()
        self.policy, self.timesteps = policy, timesteps

    def forward(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.policy.denoise(noise, cond, self.timesteps)
