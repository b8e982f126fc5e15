"""scripts/experiments/probe_encoder.py: the linear probe, the frame sampling and the supervised baseline."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from protege.datasets.replay_buffer import ReplayBuffer
from protege.policies.nets.vision import ImageEncoder

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "experiments" / "probe_encoder.py"
spec = importlib.util.spec_from_file_location("probe_encoder", SCRIPT)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def square_buffer(path: Path, n_episodes: int = 12, length: int = 10) -> ReplayBuffer:
    """Episodes whose 32x32 frames show a white square at the position held in obs/env_state[:2];
    the square stays put for the first half of each episode, then moves."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.create(str(path), fps=10)
    for _ in range(n_episodes):
        pos = np.repeat(rng.uniform(4, 24, (1, 2)), length, 0)
        pos[length // 2:] += rng.uniform(-3, 3, (length - length // 2, 2))
        frames = np.zeros((length, 32, 32, 3), np.uint8)
        for t, (x, y) in enumerate(pos.astype(int)):
            frames[t, y:y + 4, x:x + 4] = 255
        buf.append_episode({"obs/top": frames, "obs/env_state": pos.astype(np.float32),
                            "action": np.zeros((length, 2), np.float32)})
    return buf


def test_ridge_probe_separates_informative_from_useless_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = x[:, :2] @ torch.tensor([[1.0, 0.5], [-0.3, 2.0]]) + 0.01 * torch.randn(400, 2, generator=g)
    informative = probe.ridge_rmse(x[:300], y[:300], x[300:], y[300:])
    useless = probe.ridge_rmse(x[:300, 2:], y[:300], x[300:, 2:], y[300:])  # columns independent of y
    assert informative < 0.05, informative
    assert useless > 0.8 * float(y[300:].std()), useless


def test_sampling_and_supervised_baseline_locate_the_square(tmp_path):
    buf = square_buffer(tmp_path / "squares.zarr")
    frames, y, eps = probe.sample_frames(buf, "obs/top", "obs/env_state", [0, 1], per_episode=4, first=5, seed=0)
    assert frames.shape == (48, 32, 32, 3) and list(np.bincount(eps)) == [4] * 12
    starts = np.array([buf.read("obs/env_state", buf.episode_slice(e).start) for e in eps])
    assert np.allclose(y, starts)  # --first 5: only the steps before the square moves
    frames, y, eps = probe.sample_frames(buf, "obs/top", "obs/env_state", [0, 1], per_episode=10, first=0, seed=0)
    y = torch.as_tensor(y)
    train = eps < 9
    torch.manual_seed(0)
    enc = ImageEncoder(out_dim=16, num_kp=8, backbone="conv", channels=[8, 16], strides=[2, 1], crop_ratio=1.0)
    mean = probe.rmse(y[train].mean(0).expand_as(y[~train]), y[~train])
    rmse = probe.supervised_rmse(enc, frames, y, train, steps=100, lr=3e-3)
    assert rmse < 0.35 * mean, (rmse, mean)
