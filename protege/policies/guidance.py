"""Inpainting guidance for real-time chunking (Black, Galliker & Levine 2025, "Real-Time Execution of
Action Chunking Flow Policies", arXiv 2506.07339), on the policy side.

While one chunk executes, the next is sampled so that its first actions agree with the ones the
robot will still run from the current chunk: the first `frozen` actions (executed during the
inference delay) get weight 1, the rest of the overlap a weight decaying to 0 (the paper's soft
mask), later actions none. At every denoising step the sampler's clean-action estimate x̂0(x) is
pulled toward the target with pseudoinverse guidance (ΠGDM): g = (∂x̂0/∂x)ᵀ · w ⊙ (y − x̂0), a
vector-Jacobian product through the denoiser (one backward pass per step, so guided sampling runs
in eager PyTorch, not through an exported graph), scaled by the ΠGDM weight 1/r² clipped at β
(`max_weight`, the paper's 5). No retraining: any diffusion or flow policy samples this way.
Finally the frozen actions are copied from the target exactly (they are what the robot executes).

Each sampler applies `g` in its own parametrisation (`guided_eps`, `guided_velocity`, `guided_denoised`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler


@dataclass
class ChunkGuide:
    """What the next chunk should agree with, from its first action (the current step) on.

    target: (n, A) or (B, n, A) unnormalised actions (the previous chunk's, for the same steps);
    weights: (n,) in [0, 1], 1 for the first `frozen`; max_weight: β, the clip on the guidance weight."""

    target: np.ndarray | torch.Tensor
    weights: np.ndarray | torch.Tensor
    frozen: int
    max_weight: float = 5.0


def soft_mask(n_overlap: int, frozen: int) -> np.ndarray:
    """The paper's weights over an overlap of `n_overlap` steps: 1 for the `frozen` first, then
    c·(e^c − 1)/(e − 1) with c going linearly from 1 to 0 over the rest (exponential decay)."""
    w = np.zeros(n_overlap)
    w[:frozen] = 1.0
    soft = n_overlap - frozen
    if soft > 0:
        c = (soft - np.arange(soft)) / (soft + 1)
        w[frozen:] = c * np.expm1(c) / math.expm1(1.0)
    return w


def guidance_gradient(x: torch.Tensor, x0_fn: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor,
                      w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 = x0_fn(x) and ΠGDM's g = (∂x̂0/∂x)ᵀ · w ⊙ (y − x̂0), both detached."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0 = x0_fn(xg)
        (g,) = torch.autograd.grad(x0, xg, grad_outputs=w * (y - x0.detach()))
    return x0.detach(), g


def clipped_weight(r2: float, beta: float) -> float:
    """ΠGDM's guidance weight 1/r², clipped at β (large weights early in sampling are unstable)."""
    return beta if r2 <= 0 else min(beta, 1.0 / r2)


def guided_eps(eps_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, alpha_bar: float,
               y: torch.Tensor, w: torch.Tensor, beta: float) -> torch.Tensor:
    """DDIM/DDPM with an ε-prediction network: x̂0 = (x − √(1−ᾱ)·ε)/√ᾱ; the guided score adds
    c·g, i.e. ε' = ε − √(1−ᾱ)·c·g with r² = 1 − ᾱ (ΠGDM for a variance-preserving process)."""
    out: dict[str, torch.Tensor] = {}

    def x0_fn(xg: torch.Tensor) -> torch.Tensor:
        out["eps"] = eps_fn(xg)
        return (xg - math.sqrt(1 - alpha_bar) * out["eps"]) / math.sqrt(alpha_bar)

    _, g = guidance_gradient(x, x0_fn, y, w)
    return out["eps"].detach() - math.sqrt(1 - alpha_bar) * clipped_weight(1 - alpha_bar, beta) * g


def guided_step(sched: Any, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
    """A diffusers DDIM/DDPM step with a guided ε. DDIM re-derives ε from the clipped x̂0: with
    `clip_sample` the guided x̂0 is clamped to [-1, 1], and stepping along the unclipped ε would
    push the sample away from the target by the clipped-off part of the guidance."""
    if isinstance(sched, DDIMScheduler):
        return sched.step(eps, t, x, use_clipped_model_output=True).prev_sample
    return sched.step(eps, t, x).prev_sample


def guided_velocity(v_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, t: float,
                    y: torch.Tensor, w: torch.Tensor, beta: float) -> torch.Tensor:
    """Flow matching with x_t = t·noise + (1−t)·action and v = noise − action (t: 1 noise → 0 data):
    x̂0 = x − t·v. The paper's rule (its τ = 1 − t): v' = v − c·g, c = min(β, t / ((1−t)·r²)),
    r² = t² / (t² + (1−t)²)."""
    out: dict[str, torch.Tensor] = {}

    def x0_fn(xg: torch.Tensor) -> torch.Tensor:
        out["v"] = v_fn(xg)
        return xg - t * out["v"]

    _, g = guidance_gradient(x, x0_fn, y, w)
    r2 = t**2 / (t**2 + (1 - t) ** 2)
    c = beta if t >= 1 else min(beta, t / ((1 - t) * r2))
    return out["v"].detach() - c * g


def guided_denoised(d_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: float,
                    y: torch.Tensor, w: torch.Tensor, beta: float) -> torch.Tensor:
    """EDM / variance-exploding (BESO): the denoiser D(x, σ) is x̂0; the guided score (D − x)/σ² + c·g
    gives D' = D + σ²·c·g with r² = σ² / (1 + σ²)."""
    d, g = guidance_gradient(x, d_fn, y, w)
    return d + sigma**2 * clipped_weight(sigma**2 / (1 + sigma**2), beta) * g
