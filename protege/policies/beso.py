"""BESO: score-based diffusion policy (Reuss et al., RSS 2023, "Goal-Conditioned Imitation Learning
using Score-based Diffusion Policies").

The action window a (normalised to [-1, 1]) is noised as x = a + σ·n, σ continuous, and a network F
is trained through EDM's preconditioning (Karras et al. 2022, σ_data = 0.5):

    D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), obs)
    c_skip = σd²/(σ²+σd²),  c_out = σ·σd/√(σ²+σd²),  c_in = 1/√(σ²+σd²),  c_noise = ¼·ln σ
    loss   = ‖F(...) - (a - c_skip·x)/c_out‖²      (= EDM's λ(σ)-weighted denoising loss)

with σ drawn from a log-logistic distribution (loc ln σd, scale 0.5) truncated to [σ_min, σ_max].
Sampling integrates the probability-flow ODE deterministically in a few steps (default 3) on an
exponential (or Karras) σ schedule. The preconditioning, schedules and solver steps are diffusers'
`EDMEulerScheduler` (Euler; on this variance-exploding ODE it is exactly BESO's default "DDIM"
sampler) or `EDMDPMSolverMultistepScheduler` (DPM-Solver++ 2M); training takes c_skip/c_out/c_in/
c_noise from the same scheduler object, so training and sampling cannot disagree.

Denoiser: our FiLM 1-D U-Net (nets/unet1d.py), the same as Diffusion Policy's, fed c_noise instead
of an integer step. BESO's paper uses a small GPT over the observation/action tokens; we keep the
U-Net so that the BESO-vs-DDPM/DDIM comparison differs only in the diffusion formulation and sampler.

Classifier-free guidance (optional): with `goal_key` set, that observation (e.g. a goal or a task
one-hot) is dropped from the condition with probability `cond_drop_prob` during training, and at
inference D = D_uncond + w·(D_cond − D_uncond) with w = `guidance_scale` (1 = plain conditional).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from protege.policies.base import Policy, ShapeMeta
from protege.policies.guidance import ChunkGuide, guided_denoised
from protege.policies.nets.unet1d import ConditionalUnet1D

SAMPLERS = {"euler": EDMEulerScheduler, "dpmsolver++": EDMDPMSolverMultistepScheduler}


def rand_log_logistic(n: int, loc: float, scale: float, lo: float, hi: float, device: torch.device | None = None) -> torch.Tensor:
    """σ ~ log-logistic(loc, scale) truncated to [lo, hi], by inverting the CDF of a uniform draw
    restricted to [CDF(lo), CDF(hi)]. Hand-written: torch.distributions has no truncated logistic."""
    cdf = lambda v: torch.sigmoid(torch.tensor((math.log(v) - loc) / scale, dtype=torch.float64))  # noqa: E731
    c_lo, c_hi = cdf(lo), cdf(hi)
    u = torch.rand(n, dtype=torch.float64, device=device) * (c_hi - c_lo).to(device) + c_lo.to(device)
    return torch.exp(torch.logit(u) * scale + loc).float()


def edm_coefficients(sched: EDMEulerScheduler | EDMDPMSolverMultistepScheduler, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """c_skip, c_out, c_in, c_noise of EDM preconditioning at `sigma`, read off the diffusers
    scheduler (its precondition_* functions are affine in sample/model output)."""
    one, zero = torch.ones_like(sigma), torch.zeros_like(sigma)
    return {
        "c_skip": sched.precondition_outputs(one, zero, sigma),
        "c_out": sched.precondition_outputs(zero, one, sigma),
        "c_in": sched.precondition_inputs(one, sigma),
        "c_noise": sched.precondition_noise(sigma),
    }


def edm_sample(model_fn: Callable[[torch.Tensor, int], torch.Tensor], noise: torch.Tensor,
               sched: EDMEulerScheduler | EDMDPMSolverMultistepScheduler,
               inpaint: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Deterministic ODE sampling: x_0 = σ_0·noise, then per step k: F = model_fn(c_in·x, k) and the
    scheduler's solver step. Schedulers are stateful (step index, multistep history): pass one
    freshly set up with `set_timesteps`, as `BESOPolicy.make_scheduler` returns. `inpaint` (targets
    y, weights w, β): real-time chunking's guidance on the denoised estimate (`guidance.guided_denoised`)."""
    x = noise * sched.sigmas[0].to(noise)
    for k, t in enumerate(sched.timesteps):
        if inpaint is None:
            out = model_fn(sched.scale_model_input(x, t), k)
        else:
            sigma = sched.sigmas[k].to(x)
            c = edm_coefficients(sched, sigma)
            denoised = guided_denoised(lambda xg: c["c_skip"] * xg + c["c_out"] * model_fn(c["c_in"] * xg, k), x,
                                       float(sigma), *inpaint)
            out = (denoised - c["c_skip"] * x) / c["c_out"]  # the network output the solver step expects
        x = sched.step(out, t, x).prev_sample
    return x


class BESOPolicy(Policy):
    supports_guide = True

    def __init__(
        self,
        shape_meta: ShapeMeta,
        n_obs_steps: int = 2,
        horizon: int = 16,
        n_action_steps: int = 8,
        down_dims: Sequence[int] = (32, 64, 128),
        kernel_size: int = 5,
        n_groups: int = 8,
        step_embed_dim: int = 128,
        sigma_data: float = 0.5,
        sigma_min: float = 0.005,
        sigma_max: float = 1.0,
        rho: float = 7.0,
        sigma_schedule: str = "exponential",
        sampler: str = "euler",
        num_inference_steps: int = 3,
        train_sigma_scale: float = 0.5,
        noise_embed_scale: float = 100.0,
        goal_key: str | None = None,
        cond_drop_prob: float = 0.1,
        guidance_scale: float = 1.0,
        normalization: Mapping[str, str] | None = None,
        obs_encoder: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(shape_meta, n_obs_steps, horizon, n_action_steps, normalization, obs_encoder=obs_encoder)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: expected one of {sorted(SAMPLERS)}")
        if sigma_schedule not in ("exponential", "karras"):
            raise ValueError(f"sigma_schedule={sigma_schedule!r}: expected 'exponential' or 'karras'")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"expected 0 < sigma_min < sigma_max, found sigma_min={sigma_min}, sigma_max={sigma_max}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}: expected >= 1")
        self.goal_key = goal_key
        goal_dim = 0
        if goal_key is not None:
            if obs_encoder is not None:
                raise ValueError("goal_key (classifier-free guidance) with obs_encoder is not supported: use one of them")
            if goal_key not in self.obs_keys:
                raise ValueError(f"goal_key={goal_key!r} is not an observation key; expected one of {self.obs_keys}")
            self.obs_keys = [k for k in self.obs_keys if k != goal_key]  # the context; the goal is added maskably
            goal_dim = int(torch.Size(self.shape_meta[goal_key]["shape"]).numel()) + 1  # + a "goal present" bit
        self.unet = ConditionalUnet1D(
            self.action_dim, self.obs_feature_dim * n_obs_steps + goal_dim, down_dims, kernel_size, n_groups, step_embed_dim
        )
        self.sched_kwargs = dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho,
                                 sigma_schedule=sigma_schedule, prediction_type="epsilon")
        self.sampler, self.num_inference_steps = sampler, num_inference_steps
        self.train_sigma_scale, self.noise_embed_scale = train_sigma_scale, noise_embed_scale
        self.cond_drop_prob, self.guidance_scale = cond_drop_prob, guidance_scale
        self.train_sched = EDMEulerScheduler(**self.sched_kwargs)  # preconditioning for training

    def make_scheduler(self, num_steps: int, sampler: str | None = None) -> EDMEulerScheduler | EDMDPMSolverMultistepScheduler:
        """A diffusers EDM scheduler set to `num_steps` steps."""
        kwargs = dict(self.sched_kwargs)
        if num_steps == 1:
            # diffusers' exponential schedule with one step yields σ_min instead of σ_max (linspace of
            # length 1); a one-step schedule is [σ_max] under any spacing, which "karras" returns.
            kwargs["sigma_schedule"] = "karras"
        sched = SAMPLERS[sampler or self.sampler](**kwargs)
        sched.set_timesteps(num_steps)
        return sched

    def _cond(self, obs: Mapping[str, torch.Tensor], keep_goal: torch.Tensor | None = None) -> torch.Tensor:
        """Flattened condition: context window features [+ goal features · keep, keep]."""
        cond = self.low_dim_obs(obs)
        if self.goal_key is None:
            return cond
        goal = self.normalizer.normalize(self.goal_key, obs[self.goal_key][:, self.n_obs_steps - 1].float()).flatten(1)
        keep = torch.ones(goal.shape[0], 1, device=goal.device) if keep_goal is None else keep_goal.view(-1, 1).float()
        return torch.cat([cond, goal * keep, keep], dim=-1)

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        actions = self.normalizer.normalize(self.action_key, batch[self.action_key].float())
        B = actions.shape[0]
        keep = (torch.rand(B, device=actions.device) >= self.cond_drop_prob) if self.goal_key else None
        cond = self._cond(batch, keep)
        cfg = self.train_sched.config
        sigma = rand_log_logistic(B, math.log(cfg.sigma_data), self.train_sigma_scale, cfg.sigma_min, cfg.sigma_max, actions.device)
        c = {k: v.view(B, 1, 1) for k, v in edm_coefficients(self.train_sched, sigma).items()}
        noisy = actions + torch.randn_like(actions) * sigma.view(B, 1, 1)
        pred = self.unet(noisy * c["c_in"], c["c_noise"].view(B) * self.noise_embed_scale, cond)
        target = (actions - c["c_skip"] * noisy) / c["c_out"]
        return {"loss": F.mse_loss(pred, target)}

    @torch.no_grad()
    def sample(self, obs: Mapping[str, torch.Tensor], num_steps: int | None = None, sampler: str | None = None,
               guide: ChunkGuide | None = None) -> torch.Tensor:
        """Normalised action windows (B, horizon, A) by deterministic few-step ODE sampling; `guide`:
        real-time chunking (`policies/guidance.py`)."""
        sched = self.make_scheduler(num_steps or self.num_inference_steps, sampler)
        cond = self._cond(obs)
        B = cond.shape[0]
        guided = self.goal_key is not None and self.guidance_scale != 1.0
        if guided:  # conditional and unconditional halves in one batch
            cond = torch.cat([cond, self._cond(obs, torch.zeros(B, device=cond.device))])
        films = self.unet.films_per_step(sched.timesteps.to(cond) * self.noise_embed_scale, cond)

        def model_fn(x_in: torch.Tensor, k: int) -> torch.Tensor:
            if not guided:
                return self.unet(x_in, None, cond, films=films[k])
            out_c, out_u = self.unet(torch.cat([x_in, x_in]), None, cond, films=films[k]).chunk(2)
            # guidance on F equals guidance on D: D is affine in F with the same c_skip, c_out
            return out_u + self.guidance_scale * (out_c - out_u)

        noise = torch.randn(B, self.horizon, self.action_dim, device=cond.device, dtype=cond.dtype)
        inpaint = None if guide is None else (*self.guide_tensors(guide, B, self.horizon, self.n_obs_steps - 1), guide.max_weight)
        return edm_sample(model_fn, noise, sched, inpaint)

    @torch.no_grad()
    def predict_action(self, obs: Mapping[str, torch.Tensor], guide: ChunkGuide | None = None) -> torch.Tensor:
        actions = self.action_slice(self.normalizer.unnormalize(self.action_key, self.sample(obs, guide=guide)))
        return actions if guide is None else self.keep_frozen(actions, guide)
