"""Image codecs for replay-buffer frames: bytes per frame and decode frames/s on one core.

Two frame sets at 240x320 RGB:
  aloha  frames rendered by protege's ALOHA transfer-cube env (cameras top, angle, left_wrist),
         over a scripted-expert episode (flat-shaded software GL: easy to compress);
  noisy  camera-like frames: smooth shading, texture and moving shapes plus Gaussian sensor noise
         (sigma 3 grey levels, like a webcam/RealSense colour stream: hard for lossless codecs).
Rates are frames per CPU-second of the benchmark process (= per core; see `rate`).
Codecs: raw (uncompressed bytes), raw+blosc (what `--image-codec raw` stores: Blosc zstd-1 +
byte shuffle), png (level 3, what `png` stores), jpeg q95 with 4:4:4 chroma (the default),
jpeg q95 with libjpeg's usual 4:2:0 chroma subsampling (for reference), jpeg q80 (4:4:4). For each:
bytes/frame, compression ratio, decode frames/s on one thread, encode frames/s, PSNR for lossy
codecs. Also: frames/s of `ReplayBuffer.read` on random frame indices from a buffer on disk
(chunk fetch + decode, the streaming loader's path), per codec.

    MUJOCO_GL=osmesa OMP_NUM_THREADS=1 python scripts/bench_codecs.py [--frames 60] [--out bench_codecs.json]

Writes the full results as JSON and ends with one line of key=value headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

H, W = 240, 320


def aloha_frames(n: int) -> np.ndarray:
    from protege.cli import configure_rendering

    configure_rendering()
    from protege.envs import make_env, make_expert

    cams = ("top", "angle", "left_wrist")
    env = make_env("aloha_transfer_cube", cameras=cams, image_size=(H, W), max_episode_steps=400)
    expert = make_expert("aloha_transfer_cube", env, seed=0)
    obs, _ = env.reset(seed=0)
    expert.reset()
    frames, stride = [], max(1, 400 // max(1, n // len(cams)))
    for t in range(400):
        if t % stride == 0:
            frames += [obs[c] for c in cams]
        obs, _, term, trunc, _ = env.step(expert(obs))
        if term or trunc or len(frames) >= n:
            break
    env.close()
    return np.stack(frames[:n])


def noisy_frames(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    texture = rng.normal(0, 12, (H // 4, W // 4, 3)).repeat(4, 0).repeat(4, 1)  # table/wall grain
    out = np.empty((n, H, W, 3), np.uint8)
    for t in range(n):
        base = np.stack([90 + 60 * np.sin(xx / 70 + t / 20), 110 + 50 * np.cos(yy / 55), 80 + 0.3 * xx], -1)
        cx, cy = 160 + 90 * np.sin(t / 9), 120 + 60 * np.cos(t / 7)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < 35**2)[..., None] * np.array([120, -40, -30], np.float32)
        arm = ((np.abs(yy - 0.5 * xx - 40 - 10 * np.sin(t / 5)) < 12) & (xx > 60))[..., None] * np.array([-50, -50, -50], np.float32)
        img = base + texture + blob + arm + rng.normal(0, 3, (H, W, 3))
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def codecs() -> dict[str, tuple[Callable[[np.ndarray], bytes], Callable[[bytes], np.ndarray]]]:
    import numcodecs

    from protege.datasets.frames import PNG_LEVEL, decode_frame, encode_frame

    blosc = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE)
    shape = (H, W, 3)
    return {
        "raw": (lambda f: f.tobytes(), lambda b: np.frombuffer(b, np.uint8).reshape(shape).copy()),
        "raw+blosc": (lambda f: bytes(blosc.encode(f)), lambda b: np.frombuffer(blosc.decode(b), np.uint8).reshape(shape)),
        "png": (lambda f: encode_frame(f, "png", PNG_LEVEL), lambda b: decode_frame(b, "png")),
        "jpeg95": (lambda f: encode_frame(f, "jpeg", 95), lambda b: decode_frame(b, "jpeg")),
        "jpeg95-420": (lambda f: encode_frame(f, "jpeg", 95, "420"), lambda b: decode_frame(b, "jpeg")),
        "jpeg80": (lambda f: encode_frame(f, "jpeg", 80), lambda b: decode_frame(b, "jpeg")),
    }


WALL: dict[str, float] = {}


def rate(fn: Callable[[int], object], n: int, min_time: float = 0.5, name: str = "") -> float:
    """Calls of fn(i), i in range(n), per CPU-second of this process, repeated for >= `min_time`
    CPU seconds. CPU time, not wall time: the shared machine runs other jobs, and CPU seconds are
    what a core spends (decoding is single-threaded; threads zarr uses are counted too). The
    wall-clock rate goes into WALL[name] for the JSON."""
    calls, c0, t0 = 0, time.process_time(), time.perf_counter()
    while True:
        for i in range(n):
            fn(i)
        calls += n
        cpu = time.process_time() - c0
        if cpu >= min_time:
            WALL[name] = calls / (time.perf_counter() - t0)
            return calls / cpu


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def buffer_read_rate(frames: np.ndarray, codec: str, path: Path) -> float:
    """Frames/s of ReplayBuffer.read at random indices (batches of 32), store on local disk."""
    from protege.datasets.frames import ImageStorage
    from protege.datasets.replay_buffer import ReplayBuffer

    buf = ReplayBuffer.create(path, fps=10, image_storage=ImageStorage.parse(codec))
    buf.append_episode({"action": np.zeros((len(frames), 1), np.float32), "obs/cam": frames})
    buf = ReplayBuffer.open(path)
    rng = np.random.default_rng(0)
    size = min(32, len(frames))
    batches = [rng.choice(len(frames), size, replace=False) for _ in range(8)]
    return size * rate(lambda i: buf.read("obs/cam", batches[i]), len(batches), name="read")


def measure(name: str, frames: np.ndarray, tmp: Path) -> dict[str, dict[str, float]]:
    out = {}
    for cname, (enc, dec) in codecs().items():
        blobs = [enc(f) for f in frames]
        decoded = np.stack([dec(b) for b in blobs])
        row = {
            "bytes_per_frame": float(np.mean([len(b) for b in blobs])),
            "ratio": frames[0].nbytes / float(np.mean([len(b) for b in blobs])),
            "decode_fps": rate(lambda i: dec(blobs[i]), len(blobs), name="decode"),
            "encode_fps": rate(lambda i: enc(frames[i]), len(frames), 0.3),
            "psnr_db": psnr(frames, decoded),
        }
        row["decode_fps_wall"] = WALL["decode"]
        store_codec = {"raw+blosc": "raw", "png": "png", "jpeg95": "jpeg:95", "jpeg80": "jpeg:80"}.get(cname)
        if store_codec:
            row["buffer_read_fps"] = buffer_read_rate(frames, store_codec, tmp / f"{name}-{cname}.zarr")
            row["buffer_read_fps_wall"] = WALL["read"]
        out[cname] = row
        print(f"{name:6s} {cname:10s} {row['bytes_per_frame'] / 1e3:8.1f} kB/frame  x{row['ratio']:5.1f}  "
              f"decode {row['decode_fps']:7.0f} fr/s  encode {row['encode_fps']:6.0f} fr/s  PSNR {row['psnr_db']:5.1f} dB"
              + (f"  buffer.read {row['buffer_read_fps']:6.0f} fr/s" if "buffer_read_fps" in row else ""), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=60, help="frames per set")
    p.add_argument("--out", default="bench_codecs.json")
    a = p.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS")
    sets = {"aloha": aloha_frames(a.frames), "noisy": noisy_frames(a.frames)}
    tmp = Path(tempfile.mkdtemp(prefix="bench_codecs_"))
    try:
        results = {name: measure(name, frames, tmp) for name, frames in sets.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"frame_shape": [H, W, 3], "n_frames": a.frames, "OMP_NUM_THREADS": threads, "cpu_count": os.cpu_count(),
            "rates": "frames per CPU-second of this process (*_wall: per wall-clock second)",
            "loadavg_1min": os.getloadavg()[0]}
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {a.out}")
    head = []
    for name in sets:
        for c in ("raw", "png", "jpeg95"):
            r = results[name][c]
            head.append(f"{name}_{c}_kb={r['bytes_per_frame'] / 1e3:.1f} {name}_{c}_decode_fps={r['decode_fps']:.0f}")
    print(" ".join(head))


if __name__ == "__main__":
    main()
