"""BESO: EDM preconditioning and sampler math against hand-worked numbers, guidance mechanics, and a
learning test (3-step sampling solves the bimodal point mass using both routes)."""

import math

import pytest
import torch
from helpers import train_config

from protege.policies.beso import BESOPolicy, edm_coefficients, edm_sample, rand_log_logistic
from protege.training.trainer import train

META = {"obs/state": {"shape": [4], "kind": "state"}, "action": {"shape": [2], "kind": "action"}}


def tiny(**kw) -> BESOPolicy:
    kw = {"down_dims": [8, 16], "step_embed_dim": 8, "horizon": 4, "n_action_steps": 2, **kw}
    return BESOPolicy(kw.pop("shape_meta", META), **kw)


def test_preconditioning_matches_hand_worked_values():
    # sigma = sigma_data = 0.5: c_skip = .25/.5, c_out = .25/sqrt(.5), c_in = 1/sqrt(.5), c_noise = ln(.5)/4
    c = edm_coefficients(tiny().train_sched, torch.tensor([0.5]))
    assert c["c_skip"].item() == pytest.approx(0.5)
    assert c["c_out"].item() == pytest.approx(0.25 / math.sqrt(0.5))
    assert c["c_in"].item() == pytest.approx(1 / math.sqrt(0.5))
    assert c["c_noise"].item() == pytest.approx(math.log(0.5) / 4)


def test_euler_steps_match_hand_worked_case():
    # Data ~ N(0, sigma_data^2): the ideal denoiser is D = sd^2/(s^2+sd^2) x = c_skip x, i.e. F = 0.
    # Schedule (exponential, 2 steps, sigma 1 -> 0.1 -> 0), x_T = noise * 1:
    #   step 1: D = 0.2 x_T;   x_1 = (0.1/1) x_T + (1 - 0.1) D = 0.28 x_T
    #   step 2: D = .25/.26 x_1 -> sigma 0 returns D = 0.2692307... x_T
    policy = tiny(sigma_min=0.1, sigma_max=1.0)
    sched = policy.make_scheduler(2)
    assert torch.allclose(sched.sigmas, torch.tensor([1.0, 0.1, 0.0]))
    noise = torch.tensor([[[1.0, -2.0]]])
    out = edm_sample(lambda x_in, k: torch.zeros_like(x_in), noise, sched)
    assert torch.allclose(out, noise * 0.28 * 0.25 / 0.26, atol=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "dpmsolver++"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_point_data_is_recovered_exactly(sampler, steps):
    # all data at c: the ideal network output F = (c - c_skip x) / c_out, and every solver ends at D = c
    policy = tiny(sampler=sampler)
    sched = policy.make_scheduler(steps)
    assert sched.sigmas[0].item() == pytest.approx(1.0) and sched.sigmas[-1].item() == 0.0
    c = torch.tensor([0.3, -0.7])

    def model_fn(x_in, k):
        sigma = sched.sigmas[k]
        co = edm_coefficients(sched, sigma.reshape(1))
        x = x_in / co["c_in"]
        return (c - co["c_skip"] * x) / co["c_out"]

    out = edm_sample(model_fn, torch.randn(5, 4, 2), sched)
    assert torch.allclose(out, c.expand_as(out), atol=1e-4)


def test_training_noise_levels_follow_truncated_log_logistic():
    torch.manual_seed(0)
    s = rand_log_logistic(200_000, math.log(0.5), 0.5, 0.005, 1.0)
    assert s.min() >= 0.005 and s.max() <= 1.0
    cdf = lambda v: 1 / (1 + math.exp(-(math.log(v) - math.log(0.5)) / 0.5))  # noqa: E731
    expected = (cdf(0.5) - cdf(0.005)) / (cdf(1.0) - cdf(0.005))  # P(sigma < sigma_data) = 0.625
    assert (s < 0.5).float().mean().item() == pytest.approx(expected, abs=0.005)


def test_classifier_free_guidance_mixes_conditional_and_unconditional():
    meta = {**META, "obs/goal": {"shape": [2], "kind": "state"}}
    obs = {"obs/state": torch.rand(3, 2, 4), "obs/goal": torch.rand(3, 2, 2)}
    samples = {}
    for w in (0.0, 1.0, 3.0):
        torch.manual_seed(0)
        policy = tiny(shape_meta=meta, goal_key="obs/goal", guidance_scale=w)
        policy.normalizer.fit({"obs/state": torch.rand(10, 4).numpy(), "obs/goal": torch.rand(10, 2).numpy(),
                               "action": torch.rand(10, 2).numpy()})
        torch.manual_seed(1)
        samples[w] = policy.sample(obs, num_steps=1)
    torch.manual_seed(1)
    noise = torch.randn(3, 4, 2)
    for keep, w in ((torch.zeros(3), 0.0), (torch.ones(3), 1.0)):
        sched = policy.make_scheduler(1)  # schedulers are stateful: a fresh one per sampling run
        cond = policy._cond(obs, keep)
        ref = edm_sample(lambda x_in, k: policy.unet(x_in, sched.timesteps[k:k + 1] * policy.noise_embed_scale, cond), noise, sched)
        assert torch.allclose(samples[w], ref, atol=1e-5), w
    # one Euler step to sigma=0 returns D, affine in F: D_3 = D_0 + 3 (D_1 - D_0)
    assert torch.allclose(samples[3.0], samples[0.0] + 3 * (samples[1.0] - samples[0.0]), atol=1e-4)
    assert policy.compute_loss({**obs, "action": torch.rand(3, 4, 2)})["loss"].isfinite()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sampler"):
        tiny(sampler="heun")
    with pytest.raises(ValueError, match="goal_key"):
        tiny(goal_key="obs/nope")


def test_beso_three_steps_solves_bimodal_pointmass_with_both_routes(tmp_path):
    cfg = train_config(tmp_path, "task=pointmass_bimodal", "policy=beso", "policy.down_dims=[32,64]",
                       "policy.step_embed_dim=32", "policy.num_inference_steps=3", "train.steps=1500",
                       "train.batch_size=128", "eval.n_episodes=100")
    result = train(cfg, progress=False)
    ev = result["eval"]
    assert ev["success_rate"] >= 0.7, ev["success_rate"]  # 1000-step checkpoint measured 0.75, routes 45/46
    routes = ev["route_counts"]
    assert routes.get("up", 0) >= 30 and routes.get("down", 0) >= 30, routes
