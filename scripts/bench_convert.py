"""Conversion at scale: a generated ALOHA-style dataset several times a memory budget, converted
with bounded peak memory (episodes stream one at a time).

Generates `--gb` GB of `episode_<N>.hdf5` files (480x640 camera frames with smooth, moving
content plus sensor noise, 14-D qpos/qvel/action), then runs `protege convert` in a subprocess and
reports its peak RSS and throughput.

    python scripts/bench_convert.py [--gb 3] [--frames-per-episode 250] [--workdir /tmp/bench_convert]
Last line: peak_rss_mb=<x> frames_per_s=<y> input_gb=<z>
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np


def generate(folder: Path, gb: float, T: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    frame_bytes = 480 * 640 * 3
    n_episodes = max(1, int(np.ceil(gb * 1e9 / (frame_bytes * T))))
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    base = np.stack([xx / 640 * 180 + 40, yy / 480 * 120 + 60, np.full_like(xx, 90)], -1)
    for e in range(n_episodes):
        with h5py.File(folder / f"episode_{e}.hdf5", "w") as f:
            f.attrs["sim"] = True
            f["observations/qpos"] = rng.standard_normal((T, 14))
            f["observations/qvel"] = rng.standard_normal((T, 14))
            f["action"] = rng.standard_normal((T, 14))
            images = f.create_dataset("observations/images/top", (T, 480, 640, 3), dtype=np.uint8)
            for t in range(0, T, 25):
                n = min(25, T - t)
                cx = 320 + 200 * np.sin(0.05 * (np.arange(t, t + n) + e))[:, None, None]
                blob = 120 * np.exp(-(((xx[None] - cx) ** 2 + (yy[None] - 240) ** 2) / 4000))
                frames = base[None] + blob[..., None] + rng.normal(0, 3, (n, 480, 640, 1)).astype(np.float32)
                images[t : t + n] = np.clip(frames, 0, 255).astype(np.uint8)
    return n_episodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=3.0)
    p.add_argument("--frames-per-episode", type=int, default=250)
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--out", default="bench_convert.json")
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    n_episodes = generate(work / "aloha", args.gb, args.frames_per_episode)
    gen_s = time.perf_counter() - t0
    input_bytes = sum(f.stat().st_size for f in (work / "aloha").iterdir())
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "protege.cli", "convert", str(work / "aloha"), str(work / "buffer.zarr")],
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    frames = n_episodes * args.frames_per_episode
    output_bytes = sum(f.stat().st_size for f in (work / "buffer.zarr").rglob("*") if f.is_file())
    results = {"input_gb": input_bytes / 1e9, "output_gb": output_bytes / 1e9, "episodes": n_episodes, "frames": frames,
               "convert_s": wall, "frames_per_s": frames / wall, "input_mb_per_s": input_bytes / 1e6 / wall,
               "peak_rss_mb": peak_mb, "generate_s": gen_s}
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(f"peak_rss_mb={peak_mb:.0f} frames_per_s={frames / wall:.0f} input_gb={input_bytes / 1e9:.2f}")


if __name__ == "__main__":
    main()
