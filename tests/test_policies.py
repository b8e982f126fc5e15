import numpy as np
import pytest
import torch

from protege.policies import build_policy

SHAPE_META = {"obs/state": {"shape": [6], "kind": "state"}, "action": {"shape": [3], "kind": "action"}}


def make(target, **kw):
    p = build_policy({"_target_": target, "name": "x", **kw}, SHAPE_META)
    rng = np.random.default_rng(0)
    p.normalizer.fit({"obs/state": rng.uniform(-5, 5, (200, 6)), "action": rng.uniform(-2, 2, (200, 3))})
    return p


@pytest.mark.parametrize("target", ["protege.policies.bc.BCPolicy", "protege.policies.diffusion.DiffusionPolicy"])
def test_interface_shapes_and_loss(target):
    kw = {"down_dims": [16, 32], "step_embed_dim": 16} if "Diffusion" in target else {}
    p = make(target, n_obs_steps=2, horizon=8, n_action_steps=4, **kw)
    batch = {"obs/state": torch.randn(5, 2, 6), "action": torch.randn(5, 8, 3), "action_is_pad": torch.zeros(5, 8, dtype=torch.bool)}
    out = p.compute_loss(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(q.grad is not None for q in p.parameters())
    assert p.predict_action({"obs/state": torch.randn(2, 2, 6)}).shape == (2, 4, 3)


def test_precomputed_film_equals_per_step_conditioning():
    p = make("protege.policies.diffusion.DiffusionPolicy", down_dims=[16, 32, 64], step_embed_dim=16).eval()
    cond = p.low_dim_obs({"obs/state": torch.randn(3, 2, 6)})
    x = torch.randn(3, 16, 3)
    ts = torch.tensor([90, 40, 3])
    films = [f.view(3, 3, -1) for f in p.unet.films(ts.repeat_interleave(3), cond.repeat(3, 1))]
    for k, t in enumerate(ts):
        torch.testing.assert_close(p.unet(x, t, cond), p.unet(x, t, cond, films=[f[k] for f in films]))


@pytest.mark.parametrize("sched,steps", [("ddim", 10), ("ddpm", 100)])
def test_diffusion_samples_lie_in_the_action_range(sched, steps):
    p = make("protege.policies.diffusion.DiffusionPolicy", down_dims=[16, 32], step_embed_dim=16,
             inference_scheduler=sched, num_inference_steps=steps).eval()
    a = p.predict_action({"obs/state": torch.randn(4, 2, 6)})
    # clip_sample keeps normalised samples in [-1, 1] -> the demonstrated action range
    assert a.min() >= -2.0 - 1e-4 and a.max() <= 2.0 + 1e-4


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="n_action_steps"):
        make("protege.policies.bc.BCPolicy", n_obs_steps=2, horizon=4, n_action_steps=8)
    with pytest.raises(ValueError, match="inference_scheduler"):
        make("protege.policies.diffusion.DiffusionPolicy", inference_scheduler="euler")
