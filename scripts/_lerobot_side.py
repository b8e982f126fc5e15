"""LeRobot's side of `scripts/compare_lerobot.py`, run with the LeRobot venv's python.

Self-contained (numpy, psutil, torch and lerobot only: it never imports protege), so it runs in an
environment where protege is not installed. The shared helpers at the top (synthetic episodes,
peak-RSS sampler, fixed-wall-time step clock) are also imported by compare_lerobot.py, so both sides
use the same data and the same clock.

    <venv>/bin/python scripts/_lerobot_side.py <job> --spec '<json>'   ->  one JSON object on stdout

Jobs: write (a dataset with LeRobotDataset.create/add_frame/save_episode), loader, train, infer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

FPS = 50
STATE_DIM, ENV_DIM, ACTION_DIM = 14, 7, 14
IMAGE_HW = (96, 128)
REPO_ID = "protege/compare_lerobot"


# ----------------------------------------------------------------------------- shared helpers
def synthetic_episode(seed: int, steps: int, camera: bool = True) -> dict[str, np.ndarray]:
    """One learnable episode: joint positions follow a smooth random walk, the action is the next
    joint position, the environment state is a cube pose that follows two joints, and the camera
    sees a smooth background with boxes placed by the joints and the cube (frames compress like
    rendered ones, not like noise)."""
    rng = np.random.default_rng(seed)
    vel = np.cumsum(rng.normal(0, 0.004, (steps + 1, STATE_DIM)), axis=0)
    state = np.cumsum(vel, axis=0).astype(np.float32) + rng.normal(0, 0.3, STATE_DIM).astype(np.float32)
    ep = {"state": state[:-1], "action": state[1:].copy()}
    cube = np.concatenate([np.tanh(state[:-1, :3]), np.tile([1.0, 0, 0, 0], (steps, 1))], 1).astype(np.float32)
    ep["environment_state"] = cube
    if camera:
        h, w = IMAGE_HW
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(0.5, 3.0, (3, 2))
        scene = np.stack([96 + 50 * np.sin(f[i, 0] * xx / w * np.pi + f[i, 1] * yy / h * np.pi) for i in range(3)], -1)
        frames = np.empty((steps, h, w, 3), np.uint8)
        for t in range(steps):
            img = scene.copy()
            for j, (a, b) in enumerate(((0, 1), (7, 8), (20, 21))):  # two grippers and the cube
                src = cube[t] if j == 2 else state[t]
                cy = int((0.5 + 0.35 * np.tanh(src[a % 3 if j == 2 else a])) * h)
                cx = int((0.5 + 0.35 * np.tanh(src[b % 3 if j == 2 else b])) * w)
                img[max(cy - 8, 0):cy + 8, max(cx - 10, 0):cx + 10] = (70 * j + 40, 200 - 60 * j, 90 + 50 * j)
            frames[t] = img
        ep["top"] = frames
    return ep


class PeakRSS:
    """Peak of the summed RSS of this process and its descendants (DataLoader workers), sampled
    every `interval` s in a thread. Pages shared by forked workers count once per process."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(Exception):
                total += p.memory_info().rss
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class StopMeasuring(Exception):
    """Raised from a step hook when the measuring time is over (ends a training loop early)."""


class StepClock:
    """Timestamps of successive steps: `tick()` once per step; after `warmup` steps it measures for
    `seconds`, then `done` (or, with `raise_when_done`, StopMeasuring from `tick`)."""

    def __init__(self, seconds: float, warmup: int, raise_when_done: bool = False) -> None:
        self.seconds, self.warmup, self.raise_when_done = seconds, warmup, raise_when_done
        self.times: list[float] = []

    @property
    def done(self) -> bool:
        return len(self.times) > self.warmup and self.times[-1] - self.times[self.warmup] >= self.seconds

    def tick(self) -> None:
        self.times.append(time.perf_counter())
        if self.raise_when_done and self.done:
            raise StopMeasuring

    def result(self, items_per_step: int) -> dict[str, float]:
        t = np.asarray(self.times[self.warmup:])
        if len(t) < 2:
            raise RuntimeError(f"too few measured steps ({len(t)}): raise --seconds")
        dt = np.diff(t)
        return {"steps": len(dt), "seconds": float(t[-1] - t[0]), "per_s": float(len(dt) * items_per_step / (t[-1] - t[0])),
                "step_ms_median": float(np.median(dt) * 1e3)}


def latency(fn: Any, seconds: float, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return {"calls": len(ms), "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))}


def loader_deltas(n_obs_steps: int, horizon: int, camera: bool) -> dict[str, list[float]]:
    """LeRobot delta_timestamps of our window: `n_obs_steps` observations ending now, `horizon`
    actions starting at the first observation (Diffusion Policy's window)."""
    obs = [(i - n_obs_steps + 1) / FPS for i in range(n_obs_steps)]
    d = {"observation.state": obs, "observation.environment_state": obs,
         "action": [(i - n_obs_steps + 1) / FPS for i in range(horizon)]}
    if camera:
        d["observation.images.top"] = obs
    return d


# ----------------------------------------------------------------------------- LeRobot jobs
def job_write(spec: dict) -> dict:
    """Write a dataset with LeRobot's own recorder API: create, add_frame per step, save_episode."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root, camera = Path(spec["root"]), spec["camera"]
    features = {
        "observation.state": {"dtype": "float32", "shape": (STATE_DIM,), "names": None},
        "observation.environment_state": {"dtype": "float32", "shape": (ENV_DIM,), "names": None},
        "action": {"dtype": "float32", "shape": (ACTION_DIM,), "names": None},
    }
    if camera:
        features["observation.images.top"] = {"dtype": "video", "shape": (*IMAGE_HW, 3), "names": ["height", "width", "channels"]}
    t0 = time.perf_counter()
    ds = LeRobotDataset.create(REPO_ID, fps=FPS, features=features, root=root, robot_type="aloha", use_videos=camera)
    for e in range(spec["episodes"]):
        ep = synthetic_episode(e, spec["steps"], camera)
        for t in range(spec["steps"]):
            frame = {"observation.state": ep["state"][t], "observation.environment_state": ep["environment_state"][t],
                     "action": ep["action"][t], "task": "transfer the cube"}
            if camera:
                frame["observation.images.top"] = ep["top"][t]
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    import lerobot

    return {"seconds": time.perf_counter() - t0, "frames": ds.meta.total_frames, "episodes": ds.meta.total_episodes,
            "lerobot": lerobot.__version__, "codebase_version": ds.meta.info["codebase_version"]}


def _dataset(root: str, **kwargs: Any) -> Any:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(REPO_ID, root=root, **kwargs)


def job_loader(spec: dict) -> dict:
    """Windows/s of LeRobotDataset (delta_timestamps = our window) through a torch DataLoader."""
    import torch

    ds = _dataset(spec["root"], delta_timestamps=loader_deltas(spec["n_obs_steps"], spec["horizon"], spec["camera"]))
    dl = torch.utils.data.DataLoader(ds, batch_size=spec["batch_size"], shuffle=True, num_workers=spec["workers"],
                                     prefetch_factor=2 if spec["workers"] else None, drop_last=True,
                                     persistent_workers=spec["workers"] > 0)
    clock = StepClock(spec["seconds"], warmup=2)
    with PeakRSS() as rss:
        while not clock.done:
            for batch in dl:
                clock.tick()
                if clock.done:
                    break
    shapes = {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
    return {**clock.result(spec["batch_size"]), "peak_rss_mb": rss.peak / 2**20, "video_backend": ds.video_backend, "shapes": shapes}


def _policy_config(spec: dict) -> Any:
    p = spec["policy"]
    from lerobot.configs.types import FeatureType, PolicyFeature

    feats = {"observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,))}
    if "environment_state" in spec["obs"]:
        feats["observation.environment_state"] = PolicyFeature(FeatureType.ENV, (ENV_DIM,))
    if "top" in spec["obs"]:
        feats["observation.images.top"] = PolicyFeature(FeatureType.VISUAL, (3, *IMAGE_HW))
    common = dict(device="cpu", push_to_hub=False, input_features=feats)
    if p["type"] == "act":
        from lerobot.policies.act.configuration_act import ACTConfig

        return ACTConfig(**common, chunk_size=p["chunk_size"], n_action_steps=p["chunk_size"], dim_model=p["hidden_dim"],
                         n_heads=p["n_heads"], dim_feedforward=p["dim_feedforward"], n_encoder_layers=p["n_encoder_layers"],
                         n_decoder_layers=p["n_decoder_layers"], n_vae_encoder_layers=p["n_vae_encoder_layers"],
                         latent_dim=p["latent_dim"], pretrained_backbone_weights=None, vision_backbone="resnet18")
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    return DiffusionConfig(**common, n_obs_steps=p["n_obs_steps"], horizon=p["horizon"], n_action_steps=p["n_action_steps"],
                           down_dims=tuple(p["down_dims"]), kernel_size=p["kernel_size"], n_groups=p["n_groups"],
                           diffusion_step_embed_dim=p["step_embed_dim"], noise_scheduler_type="DDIM",
                           num_train_timesteps=p["num_train_timesteps"], num_inference_steps=p["num_inference_steps"])


def job_train(spec: dict) -> dict:
    """LeRobot's own training loop (`lerobot.scripts.lerobot_train.train`), timed at every
    `update_policy` call and stopped after the measuring time."""
    import torch

    import lerobot.scripts.lerobot_train as lt
    from lerobot.configs.default import DatasetConfig, WandBConfig
    from lerobot.configs.train import TrainPipelineConfig

    torch.set_num_threads(spec["threads"])
    clock = StepClock(spec["seconds"], warmup=spec["warmup"], raise_when_done=True)
    update, info = lt.update_policy, {}

    def timed_update(*args: Any, **kwargs: Any) -> Any:
        clock.tick()  # consecutive calls: one full loop iteration (data wait + preprocess + update)
        if "params" not in info:
            info["params"] = sum(p.numel() for p in args[1].parameters())
            info["batch_keys"] = {k: list(v.shape) for k, v in args[2].items() if hasattr(v, "shape")}
        out = update(*args, **kwargs)
        info.setdefault("losses", []).append(float(out[0].loss.avg if hasattr(out[0].loss, "avg") else out[0].loss))
        return out

    lt.update_policy = timed_update
    import tempfile

    out_dir = Path(tempfile.mkdtemp(prefix="compare-theirs-", dir=spec.get("tmp"))) / "run"  # must not exist yet
    cfg = TrainPipelineConfig(dataset=DatasetConfig(repo_id=REPO_ID, root=spec["root"]), policy=_policy_config(spec),
                              output_dir=out_dir, batch_size=spec["batch_size"], steps=10**9,
                              num_workers=spec["workers"], eval_freq=0, log_freq=10**9, save_checkpoint=False,
                              wandb=WandBConfig(enable=False), seed=0)
    with PeakRSS() as rss:
        try:
            lt.train(cfg)
        except StopMeasuring:
            pass
    import shutil

    shutil.rmtree(out_dir.parent, ignore_errors=True)
    return {**clock.result(spec["batch_size"]), "peak_rss_mb": rss.peak / 2**20, "params": info.get("params"),
            "batch": info.get("batch_keys"), "first_losses": info.get("losses", [])[:3], "last_losses": info.get("losses", [])[-3:]}


def job_infer(spec: dict) -> dict:
    """Batch-1 latency of one action chunk: preprocessor -> predict_action_chunk -> postprocessor."""
    import torch

    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    meta = LeRobotDatasetMetadata(REPO_ID, root=spec["root"])
    cfg = _policy_config(spec)
    policy = make_policy(cfg, ds_meta=meta)
    pre, post = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    policy.eval()
    ep = synthetic_episode(0, 4, camera="top" in spec["obs"])
    obs = {"observation.state": torch.from_numpy(ep["state"][0]),
           "observation.environment_state": torch.from_numpy(ep["environment_state"][0]), "task": "transfer the cube"}
    if "top" in spec["obs"]:
        obs["observation.images.top"] = torch.from_numpy(ep["top"][0]).permute(2, 0, 1).float() / 255
    obs = {k: v for k, v in obs.items() if k == "task" or k.removeprefix("observation.").removeprefix("images.") in spec["obs"]}
    policy.reset()
    with torch.no_grad():
        if spec["policy"]["type"] == "diffusion":
            policy.select_action(pre(dict(obs)))  # fills the observation queues (n_obs_steps)

        def chunk() -> Any:
            with torch.no_grad():
                batch = pre(dict(obs))
                return post(policy.predict_action_chunk(batch))

        with PeakRSS() as rss:
            res = latency(chunk, spec["seconds"])
            shape = list(chunk().shape)
    return {**res, "peak_rss_mb": rss.peak / 2**20, "chunk_shape": shape, "params": sum(p.numel() for p in policy.parameters())}


JOBS = {"write": job_write, "loader": job_loader, "train": job_train, "infer": job_infer}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("job", choices=sorted(JOBS))
    ap.add_argument("--spec", required=True, help="JSON object with the job's settings")
    a = ap.parse_args()
    spec = json.loads(a.spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # libraries print progress: keep stdout for the one JSON line
    result = JOBS[a.job](spec)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
