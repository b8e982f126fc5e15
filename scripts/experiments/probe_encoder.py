"""Does a trained image policy's camera encoder see the object? A linear probe of its features.

An image policy can fit its demonstrations (training loss near zero) and still fail in new episodes
because it never learned where the object is: with the joints in the observation, the next actions of
a scripted demo are predictable from the arm's own state once it moves. This script measures it:

1. frames from held-out episodes of the buffer go through the checkpoint's camera encoder (evaluation
   mode: centre crop), and a ridge regression from those features to the object position
   (`--target`, default the cube's x, y in `obs/env_state`) is fitted on the other episodes; `--first N`
   keeps to the steps before the arm reaches the object, where only the image can say where it is;
2. the held-out error is compared with predicting the mean position (features that carry nothing);
3. `--supervised N`: the same encoder architecture, freshly initialised, trained N steps to regress the
   position directly: what the architecture can localise at this image size, for scale.

    python scripts/experiments/probe_encoder.py runs/visuomotor/aloha_transfer_cube_diffusion_image \\
        --dataset data/tc100.zarr --supervised 600

Policies whose cameras go through `CameraEncoders` (Diffusion Policy) are supported. Last line:
`probe_rmse_cm=<a> mean_rmse_cm=<b> supervised_rmse_cm=<c>` (targets in metres, reported in cm).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from protege.datasets.replay_buffer import ReplayBuffer
from protege.errors import ConfigError
from protege.training.checkpoint import load_policy


def sample_frames(buffer: ReplayBuffer, camera: str, target: str, cols: list[int], per_episode: int,
                  first: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`per_episode` random steps among the `first` of every episode (0: all): frames, target values and
    episode index per row."""
    rng = np.random.default_rng(seed)
    idx, eps = [], []
    for e in range(buffer.n_episodes):
        s = buffer.episode_slice(e)
        steps = np.arange(s.start, min(s.stop, s.start + first) if first else s.stop)
        idx.append(np.sort(rng.choice(steps, size=min(per_episode, len(steps)), replace=False)))
        eps.append(np.full(len(idx[-1]), e))
    idx = np.concatenate(idx)
    return buffer.read(camera, idx), buffer.read(target, idx)[:, cols].astype(np.float32), np.concatenate(eps)


def rmse(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Root mean squared error over every coordinate of every row."""
    return float(((pred.double() - y.double()) ** 2).mean().sqrt())


@torch.no_grad()
def encode(encoder: nn.Module, frames: np.ndarray, batch: int = 256) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(torch.as_tensor(frames[i:i + batch])) for i in range(0, len(frames), batch)])


def ridge_rmse(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
               alpha: float = 1e-3) -> float:
    """Held-out RMSE (per coordinate) of a ridge regression with a bias, features standardised."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    design = lambda x: torch.cat([(x - mu) / sd, torch.ones(len(x), 1)], 1)  # noqa: E731
    a = design(x_train).double()
    w = torch.linalg.solve(a.T @ a + alpha * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y_train.double())
    return rmse(design(x_test).double() @ w, y_test)


def supervised_rmse(encoder: nn.Module, frames: np.ndarray, y: torch.Tensor, train: np.ndarray, steps: int,
                    lr: float = 1e-3, batch: int = 64, seed: int = 0) -> float:
    """Train a fresh copy of `encoder` + a linear head to regress `y` on the train rows; held-out RMSE."""
    torch.manual_seed(seed)
    net = copy.deepcopy(encoder)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    mu, sd = y[train].mean(0), y[train].std(0)
    model = nn.Sequential(net, nn.Linear(net.out_dim, y.shape[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rows, rng = np.flatnonzero(train), np.random.default_rng(seed)
    model.train()
    for _ in tqdm(range(steps), desc="supervised", leave=False):
        i = rng.choice(rows, batch)
        loss = nn.functional.mse_loss(model(torch.as_tensor(frames[i])), (y[i] - mu) / sd)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rmse(encode(model, frames[~train]) * sd + mu, y[~train])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run directory or checkpoint folder of an image Diffusion Policy")
    p.add_argument("--dataset", required=True, help="replay buffer with the camera and the target key")
    p.add_argument("--camera", default=None, help="camera key (default: the policy's only camera)")
    p.add_argument("--target", default="obs/env_state", help="buffer key holding the object position")
    p.add_argument("--cols", default="0,1", help="columns of --target to regress (default: x, y)")
    p.add_argument("--per-episode", type=int, default=20, help="frames sampled per episode")
    p.add_argument("--first", type=int, default=0,
                   help="sample only the first N steps of each episode, before the object moves (0: all steps)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of episodes (the last ones) held out")
    p.add_argument("--supervised", type=int, default=0, help="also train a fresh encoder this many steps")
    args = p.parse_args()

    policy = load_policy(args.checkpoint)
    cams = getattr(getattr(policy, "image_encoders", None), "cameras", {})
    if not cams:
        raise ConfigError(f"{args.checkpoint}: the policy has no per-camera encoders to probe "
                          f"(supported: policies whose cameras go through CameraEncoders, e.g. diffusion_image)")
    camera = args.camera or next(iter(cams))
    if camera not in cams:
        raise ConfigError(f"--camera {camera!r}: the policy's cameras are {sorted(cams)}")
    buffer = ReplayBuffer.open(args.dataset)
    cols = [int(c) for c in args.cols.split(",")]
    frames, y, eps = sample_frames(buffer, camera, args.target, cols, args.per_episode, args.first, seed=0)
    y = torch.as_tensor(y)
    train = eps < round(buffer.n_episodes * (1 - args.holdout))
    feats = encode(cams[camera], frames)
    probe = ridge_rmse(feats[train], y[train], feats[~train], y[~train])
    mean = rmse(y[train].mean(0).expand_as(y[~train]), y[~train])
    print(f"{len(frames)} frames of {buffer.n_episodes} episodes ({int((~train).sum())} held out), "
          f"{feats.shape[1]} features from {camera}, target {args.target}[{args.cols}]")
    print(f"linear probe of the policy's encoder: {100 * probe:.2f} cm RMSE; predicting the mean: {100 * mean:.2f} cm")
    sup = float("nan")
    if args.supervised:
        sup = supervised_rmse(cams[camera], frames, y, train, args.supervised)
        print(f"same architecture trained {args.supervised} steps on the position: {100 * sup:.2f} cm RMSE")
    print(f"probe_rmse_cm={100 * probe:.2f} mean_rmse_cm={100 * mean:.2f} supervised_rmse_cm={100 * sup:.2f}")


if __name__ == "__main__":
    main()
