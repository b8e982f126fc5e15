"""Real-time chunking (runtime/chunking.py + policies/guidance.py): frozen actions are kept exactly,
and on a bimodal synthetic case the joins are smoother than plain switching."""

import numpy as np
import pytest
import torch
from torch import nn

from protege.policies import build_policy
from protege.policies.guidance import ChunkGuide, soft_mask
from protege.runtime.chunking import ChunkQueue, RealTimeChunker, TemporalEnsembler, make_executor

SHAPE_META = {"obs/state": {"shape": [2], "kind": "state"}, "action": {"shape": [2], "kind": "action"}}
H, A = 16, 2


class TwoModeDenoiser(nn.Module):
    """The exact ε-predictor (posterior mean) for data that is one of two constant chunks, ±0.5, each
    with probability ½: a new chunk sampled on its own picks either, like the two routes around an
    obstacle, and a join between chunks of the same mode is smooth."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("modes", torch.stack([torch.full((H, A), 0.5), torch.full((H, A), -0.5)]))  # (2, H, A)
        self.register_buffer("ab", alphas_cumprod)
        self.anchor = nn.Parameter(torch.zeros(()))  # the policy needs a parameter for .device

    def films_per_step(self, timesteps: torch.Tensor, cond: torch.Tensor) -> list[list[torch.Tensor]]:
        return [[t] for t in timesteps]  # the step is all the "conditioning" this denoiser needs

    def forward(self, x: torch.Tensor, t, cond, films) -> torch.Tensor:
        ab = self.ab[films[0]]
        d2 = ((x[:, None] - ab.sqrt() * self.modes[None]) ** 2).flatten(2).sum(-1)  # (B, 2)
        p = torch.softmax(-d2 / (2 * (1 - ab)), dim=1)
        x0 = torch.einsum("bm,mha->bha", p, self.modes)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


def two_mode_policy(steps: int = 10):
    p = build_policy({"_target_": "protege.policies.diffusion.DiffusionPolicy", "down_dims": [8, 16], "step_embed_dim": 8,
                      "n_obs_steps": 1, "horizon": H, "n_action_steps": H, "num_inference_steps": steps}, SHAPE_META)
    p.normalizer.fit({"obs/state": np.array([[-1.0, -1.0], [1.0, 1.0]]), "action": np.array([[-1.0, -1.0], [1.0, 1.0]])})
    p.unet = TwoModeDenoiser(p.inference_scheduler.alphas_cumprod.float())
    return p.eval()


def run(executor, policy, steps: int, delay: int, seed: int) -> tuple[np.ndarray, list[int], list[tuple]]:
    """Execute `steps` control steps; a chunk requested at s arrives at s + delay. Returns the executed
    actions, the join steps and (guide, chunk) of every guided request."""
    torch.manual_seed(seed)
    obs = {"obs/state": torch.zeros(1, 1, 2)}
    actions, joins, guided, pending = [], [], [], None
    for step in range(steps):
        if pending is not None and pending[0] <= step:
            executor.add(pending[2], pending[1])
            joins.append(step)
            pending = None
        if pending is None and executor.wants_chunk(step + delay):
            guide = executor.guide(step, delay)
            chunk = (policy.predict_action(obs) if guide is None else policy.predict_action(obs, guide=guide))[0].numpy()
            if guide is not None:
                guided.append((guide, chunk))
            if executor.needs_chunk(step):
                executor.add(chunk, step)
                joins.append(step)
            else:
                pending = (step + delay, step, chunk)
        actions.append(executor.action(step))
    return np.stack(actions), joins, guided


def join_jerk(actions: np.ndarray, joins: list[int]) -> float:
    return float(np.mean([np.linalg.norm(actions[j] - 3 * actions[j - 1] + 3 * actions[j - 2] - actions[j - 3])
                          for j in joins if j >= 3]))


def test_soft_mask_is_frozen_then_decays_to_zero():
    w = soft_mask(8, 3)
    assert (w[:3] == 1).all() and (np.diff(w[3:]) < 0).all() and 0 < w[-1] < 0.05 and w[3] < 1


def test_rtc_keeps_frozen_actions_exactly_and_follows_the_overlap():
    p = two_mode_policy()
    target = np.full((10, A), -0.5, np.float32) + np.linspace(0, 0.1, 10, dtype=np.float32)[:, None]  # near the '-' mode
    guide = ChunkGuide(target, soft_mask(10, 4), 4)
    for seed in range(5):
        torch.manual_seed(seed)
        chunk = p.predict_action({"obs/state": torch.zeros(2, 1, 2)}, guide=guide).numpy()
        assert np.array_equal(chunk[:, :4], np.broadcast_to(target[:4], (2, 4, A)))  # bit-exact
        assert (chunk[:, 4:10] < 0).all()  # the rest of the chunk stays on the frozen actions' mode


@pytest.mark.parametrize("delay", [2, 4])
def test_rtc_joins_are_smoother_than_switching(delay):
    p = two_mode_policy()
    jerk = {}
    for name, make in {"switch": lambda: ChunkQueue(execute_steps=8), "rtc": lambda: RealTimeChunker(execute_steps=8)}.items():
        per_seed = []
        for seed in range(4):
            actions, joins, guided = run(make(), p, 60, delay, seed)
            per_seed.append(join_jerk(actions, joins))
            for guide, chunk in guided:  # what the robot ran during the delay is what the chunk holds
                assert np.array_equal(chunk[: guide.frozen], guide.target[: guide.frozen])
        jerk[name] = np.mean(per_seed)
    # switching jumps between the two modes at about half the joins; rtc stays on the executed one
    assert jerk["rtc"] < 0.25 * jerk["switch"], jerk


def test_executor_choice_and_requests():
    assert isinstance(make_executor(None, "rtc", 8), RealTimeChunker)
    assert isinstance(make_executor(None, "ensemble"), TemporalEnsembler)
    assert type(make_executor(None)) is ChunkQueue
    with pytest.raises(ValueError, match="chunk_join"):
        make_executor(None, "blend")
    q = RealTimeChunker(execute_steps=5)
    q.add(np.arange(12.0)[:, None], start=10)
    assert not q.wants_chunk(14) and q.wants_chunk(15) and not q.needs_chunk(21) and q.needs_chunk(22)
    g = q.guide(13, delay=2)
    assert g.frozen == 2 and np.array_equal(g.target[:, 0], np.arange(3.0, 12.0)) and len(g.weights) == 9
    assert ChunkQueue().guide(0, 1) is None


def test_beso_samples_with_rtc_guidance():
    p = build_policy({"_target_": "protege.policies.beso.BESOPolicy", "down_dims": [8, 16], "step_embed_dim": 8,
                      "n_obs_steps": 1, "horizon": H, "n_action_steps": H}, SHAPE_META)
    p.normalizer.fit({"obs/state": np.array([[-1.0, -1.0], [1.0, 1.0]]), "action": np.array([[-1.0, -1.0], [1.0, 1.0]])})
    p.eval()
    obs = {"obs/state": torch.zeros(8, 1, 2)}
    target = np.full((10, A), 0.6, np.float32)
    torch.manual_seed(0)
    free = p.predict_action(obs)
    torch.manual_seed(0)
    guided = p.predict_action(obs, guide=ChunkGuide(target, soft_mask(10, 3), 3))
    assert torch.equal(guided[:, :3], torch.from_numpy(target[:3]).expand(8, 3, A))
    assert (guided[:, 3:6] - 0.6).abs().mean() < 0.9 * (free[:, 3:6] - 0.6).abs().mean()  # pulled toward the target
