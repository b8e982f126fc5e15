"""Image pipeline: per-sample augmentation, ResNet-18 variants, image Diffusion Policy end to end."""

import numpy as np
import pytest
import torch

from protege.errors import ConfigError
from protege.policies.diffusion import DiffusionPolicy
from protege.policies.nets.vision import IMAGENET_MEAN, IMAGENET_STD, ImageAugment, resnet18_trunk


def test_augment_crops_per_sample_in_training_and_centre_in_eval():
    torch.manual_seed(0)
    img = torch.arange(20 * 20, dtype=torch.float32).view(1, 20, 20, 1).expand(16, 20, 20, 3).to(torch.uint8)
    aug = ImageAugment(crop_ratio=0.5, imagenet_norm=False)
    out = aug.train()(img)
    assert out.shape == (16, 3, 10, 10)
    corners = {round(float(o[0, 0, 0]) * 255) for o in out}
    assert len(corners) > 4  # each sample got its own crop offset
    for o in out:  # every crop is a contiguous 10x10 window of the source
        top_left = round(float(o[0, 0, 0]) * 255)
        r, c = divmod(top_left, 20)
        assert torch.equal((o[0] * 255).round().to(torch.uint8), img[0, r:r + 10, c:c + 10, 0])
    ev = aug.eval()(img)
    assert torch.equal(ev[0], ev[1]) and round(float(ev[0, 0, 0, 0]) * 255) == 5 * 20 + 5  # centre crop


def test_augment_jitter_is_per_sample_and_imagenet_normalised():
    torch.manual_seed(0)
    img = torch.full((8, 4, 4, 3), 128, dtype=torch.uint8)
    aug = ImageAugment(jitter=0.3).train()
    out = aug(img)
    assert len({round(float(o.mean()), 4) for o in out}) == 8
    plain = ImageAugment().eval()(img)
    expect = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(plain[0, :, 0, 0], expect, atol=1e-6)


@pytest.mark.parametrize("norm", ["group_norm", "frozen_bn", "batch_norm"])
def test_resnet_trunk_norms(norm):
    net = resnet18_trunk(norm)
    assert net(torch.zeros(2, 3, 64, 96)).shape == (2, 512, 2, 3)
    has = {type(m).__name__ for m in net.modules()}
    assert {"group_norm": "GroupNorm", "frozen_bn": "FrozenBatchNorm2d", "batch_norm": "BatchNorm2d"}[norm] in has


def test_resnet_weights_from_local_file_and_clear_errors(tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    net = resnet18_trunk("frozen_bn", str(tmp_path / "r18.pth"))
    assert torch.equal(net[0].weight, src.conv1.weight)
    gn = resnet18_trunk("group_norm", str(tmp_path / "r18.pth"))  # conv weights kept, BN stats dropped
    assert torch.equal(gn[0].weight, src.conv1.weight)
    with pytest.raises(ConfigError, match="file not found"):
        resnet18_trunk("frozen_bn", str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="expected one of"):
        resnet18_trunk("layer_norm")


def test_image_diffusion_policy_one_encoder_per_camera_gets_gradient():
    meta = {"obs/state": {"shape": [3], "kind": "state"}, "obs/a": {"shape": [64, 64, 3], "kind": "image"},
            "obs/b": {"shape": [64, 96, 3], "kind": "image"}, "action": {"shape": [2], "kind": "action"}}
    policy = DiffusionPolicy(meta, n_obs_steps=2, horizon=8, n_action_steps=4, down_dims=[32, 64], step_embed_dim=32,
                             image={"out_dim": 16, "num_kp": 8, "crop_ratio": 0.9})
    policy.normalizer.fit({"obs/state": np.random.randn(10, 3), "action": np.random.randn(10, 2)})
    assert set(policy.image_encoders.cameras) == {"obs/a", "obs/b"} and policy.image_encoders.dim == 16 + 16 and policy.state_feature_dim == 3
    obs = {"obs/state": torch.randn(4, 2, 3), "obs/a": torch.randint(0, 256, (4, 2, 64, 64, 3), dtype=torch.uint8),
           "obs/b": torch.randint(0, 256, (4, 2, 64, 96, 3), dtype=torch.uint8)}
    policy.compute_loss({**obs, "action": torch.randn(4, 8, 2)})["loss"].backward()
    for cam in ("obs/a", "obs/b"):
        assert policy.image_encoders.cameras[cam].trunk[0].weight.grad.abs().sum() > 0, cam
    policy.eval()
    assert policy.predict_action(obs).shape == (4, 4, 2)


def test_image_policy_trains_checkpoints_and_evaluates(tmp_path):
    """The whole path with a camera: collect -> train -> checkpoint -> evaluate (env/camera check included)."""
    from helpers import train_config

    from protege.training.checkpoint import load_policy
    from protege.training.trainer import train

    cfg = train_config(tmp_path, "task=pointmass_image", "task.n_demos=4", "policy=diffusion_image",
                       "policy.down_dims=[16,32]", "policy.image.num_kp=4", "train.steps=3", "train.batch_size=4",
                       "eval.n_episodes=2", "eval.n_envs=2", "eval.max_episode_steps=10")
    result = train(cfg, progress=False)
    assert result["eval"]["n_episodes"] == 2
    policy = load_policy(cfg.run_dir)
    assert "obs/top" in policy.image_encoders.cameras and policy.shape_meta["obs/top"]["shape"] == [32, 32, 3]


def test_conv_trunk_keeps_a_fine_feature_map_and_spatial_softmax_refuses_1x1():
    from protege.policies.nets.vision import ImageEncoder, SpatialSoftmax, build_trunk

    trunk = build_trunk("conv", channels=[8, 16], strides=[2, 2])
    assert trunk(torch.zeros(2, 3, 32, 32)).shape == (2, 16, 8, 8) and trunk.out_channels == 16
    # a ResNet-18 turns a 32x32 frame into one cell: the keypoints would be the same for every image
    enc = ImageEncoder(backbone="resnet18", crop_ratio=1.0)
    with pytest.raises(ConfigError, match="1x1 feature map"):
        enc(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    # on the conv trunk the keypoints follow the content: a bright dot moved across the frame moves them
    ss = SpatialSoftmax(1, num_kp=1)
    with torch.no_grad():
        ss.proj.weight.fill_(20.0), ss.proj.bias.zero_()
    left, right = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    left[..., 4, 1], right[..., 4, 6] = 1.0, 1.0
    assert ss(left)[0, 0] < -0.5 and ss(right)[0, 0] > 0.5
    with pytest.raises(ConfigError, match="expected one of"):
        build_trunk("vgg")
    with pytest.raises(ConfigError, match="frozen_bn needs pretrained"):
        build_trunk("conv", norm="frozen_bn")


def test_act_backbone_without_weights_is_never_frozen_bn(caplog):
    """policy=act's default (`backbone_norm: auto`) without ImageNet weights trains a group-norm backbone at
    the main lr and says so; asking for frozen batch norm on a random-init backbone is refused."""
    import logging

    from omegaconf import OmegaConf

    from protege.cli import compose
    from protege.policies.act import ACTPolicy
    from protege.policies.base import build_policy

    meta = {"obs/state": {"shape": [2], "kind": "state"}, "obs/top": {"shape": [32, 32, 3], "kind": "image"},
            "action": {"shape": [2], "kind": "action"}}
    cfg = compose("train", ["policy=act"]).policy
    assert cfg.backbone_norm == "auto" and cfg.backbone_weights is None
    small = OmegaConf.merge(cfg, {"hidden_dim": 32, "dim_feedforward": 32, "n_heads": 2, "n_encoder_layers": 1,
                                  "n_vae_encoder_layers": 1, "chunk_size": 4, "n_action_steps": 4})
    with caplog.at_level(logging.WARNING, logger="protege.policies"):
        policy = build_policy(small, meta)
    assert "group norm" in caplog.text and "policy.backbone_weights" in caplog.text
    mods = {type(m).__name__ for m in policy.backbones.modules()}
    assert "GroupNorm" in mods and "FrozenBatchNorm2d" not in mods
    assert policy.backbone_lr is None  # trained at train.lr, not ACT's 1e-5 for pretrained features
    assert all(p.requires_grad for p in policy.backbones.parameters())
    with pytest.raises(ConfigError, match="backbone_weights"):
        ACTPolicy(meta, chunk_size=4, n_action_steps=4, hidden_dim=32, dim_feedforward=32, n_heads=2,
                  backbone_norm="frozen_bn", backbone_weights=None)


def test_pointmass_image_goal_shows_the_goal_only_in_pixels():
    from protege.envs import make_env, make_expert

    env = make_env("pointmass_image_goal", cameras=("top",), image_size=32)
    assert env.observation_space["state"].shape == (2,)
    frames = []
    for seed in (0, 1):
        obs, _ = env.reset(seed=seed)
        assert obs["state"].shape == (2,) and np.allclose(obs["state"], env.pos)
        frames.append(obs["top"])
        green = (frames[-1][..., 1].astype(int) - frames[-1][..., 0]) > 60  # the goal disc
        ys, xs = np.nonzero(green)
        px = np.array([xs.mean() / 31 * 2 - 1, 1 - ys.mean() / 31 * 2])
        assert np.linalg.norm(px - env.goal) < 0.08  # the frame locates the goal to ~1 pixel
    assert not np.array_equal(frames[0], frames[1])
    expert = make_expert("pointmass_image_goal", env, seed=0)  # reads the goal from the env, not the obs
    expert.reset()
    for _ in range(80):
        obs, _, done, _, info = env.step(expert(obs))
        if done:
            break
    assert info["success"]
    with pytest.raises(ValueError, match="needs cameras"):
        make_env("pointmass_image_goal")
