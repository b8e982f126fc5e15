"""protege and LeRobot side by side, in one run, on one dataset written by LeRobot's own writer.

1. Creates (or reuses) a separate venv with `pip install lerobot` (default ~/.cache/protege/lerobot-venv;
   LeRobot pins an older torch, so it never touches this environment) and, best effort, the system
   FFmpeg libraries its default video decoder (torchcodec) loads (apt-get, as scripts/setup.sh does);
   without them LeRobot's side decodes with PyAV.
2. Writes --episodes x --steps frames (14-D state, 7-D environment state, 14-D action, one 96x128
   `top` camera stored as video) with `LeRobotDataset.create` / `add_frame` / `save_episode`, plus the
   same episodes without the camera, and converts the camera dataset with `protege convert`.
3. Measures, alternating ours and theirs, each side in its own process for --seconds of wall time
   after a warm-up (so peak RSS, summed over the process and its DataLoader workers, is comparable):
   a. loader windows/s for Diffusion Policy's window (2 observation steps, 16 actions), with and
      without the camera: LeRobotDataset(delta_timestamps) + DataLoader(num_workers=--workers) vs our
      training loader (`protege.datasets.loader`: in-memory copy + vectorised window sampler);
   b. training samples/s of each side's own training loop (`lerobot_train.train` vs protege's
      trainer) at matched configurations: ACT (ResNet-18, hidden 512, 4+1 layers, 4 CVAE layers,
      chunk 100, batch 8, state + camera) and Diffusion Policy (U-Net --dp-dims, horizon 16,
      2 observation steps, batch --dp-batch, state + environment state: LeRobot's refuses pure state);
   c. batch-1 latency of one action chunk (DDIM with the same number of steps for Diffusion Policy;
      ours through the runtime `protege eval` / `protege run` use, ONNX Runtime by default, for both
      policies; LeRobot's preprocessor -> predict_action_chunk -> postprocessor);
   d. peak RSS of each process tree.

    python scripts/compare_lerobot.py                        # ~10 min on 2 cores
    python scripts/compare_lerobot.py --seconds 10 --only loader_state,act_infer

Writes everything to --out (JSON); prints a markdown table and, last,
`loader_x=<a> act_train_x=<b> dp_train_x=<c> dp_infer_x=<d> act_infer_x=<e>` (ours / theirs; > 1 = ours
faster; loader_x is the smaller of the two loader ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lerobot_side import (  # noqa: E402
    PeakRSS, StepClock, StopMeasuring, latency, synthetic_episode,
)

REPO = Path(__file__).resolve().parent.parent
THEIRS = Path(__file__).resolve().parent / "_lerobot_side.py"
DEFAULT_VENV = Path(os.environ.get("PROTEGE_LEROBOT_VENV", Path.home() / ".cache" / "protege" / "lerobot-venv"))

# matched architectures (our config keys; the LeRobot side maps them onto ACTConfig / DiffusionConfig)
ACT = dict(type="act", chunk_size=100, hidden_dim=512, n_heads=8, dim_feedforward=3200, n_encoder_layers=4,
           n_decoder_layers=1, n_vae_encoder_layers=4, latent_dim=32)
DP = dict(type="diffusion", n_obs_steps=2, horizon=16, n_action_steps=8, kernel_size=5, n_groups=8, step_embed_dim=128,
          num_train_timesteps=100, num_inference_steps=10)


# ----------------------------------------------------------------------------- environment
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, requirement: str) -> str:
    """The venv's lerobot version; creates the venv and installs `requirement` when needed."""
    py = venv_python(venv)
    probe = [str(py), "-c", "import lerobot; print(lerobot.__version__)"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    print(f"creating {venv} with `pip install {requirement}` (a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement], check=True)
    return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()


def ensure_ffmpeg() -> bool:
    """System FFmpeg libraries (torchcodec loads them); best effort with apt-get, like scripts/setup.sh."""
    have = lambda: "libavcodec" in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout  # noqa: E731
    if have():
        return True
    if shutil.which("apt-get"):
        sudo = [] if os.geteuid() == 0 or not shutil.which("sudo") else ["sudo"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        ok = subprocess.run([*sudo, "apt-get", "update", "-qq"], capture_output=True, env=env).returncode == 0 and \
            subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "ffmpeg"], capture_output=True, env=env).returncode == 0
        if ok and have():
            return True
    print("compare_lerobot: no system FFmpeg libraries (apt-get install ffmpeg failed or unavailable); "
          "LeRobot's side decodes video with PyAV instead of its default torchcodec", file=sys.stderr)
    return False


def run_json(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run a worker; its last stdout line is a JSON object; stderr goes to `log`."""
    with open(log, "a") as err:
        err.write(f"\n$ {' '.join(cmd)}\n")
        err.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"worker failed (exit {proc.returncode}): {' '.join(cmd[:3])} ...; see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def theirs(venv: Path, job: str, spec: dict, log: Path) -> dict:
    return run_json([str(venv_python(venv)), str(THEIRS), job, "--spec", json.dumps(spec)], log)


def with_repo_path() -> dict[str, str]:
    """This environment, with this checkout first on PYTHONPATH (protege runs from here, installed or not)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def ours(job: str, spec: dict, log: Path) -> dict:
    return run_json([sys.executable, str(Path(__file__).resolve()), "--ours", job, "--spec", json.dumps(spec)], log, with_repo_path())


# ----------------------------------------------------------------------------- our side (in its own process)
def our_obs_keys(names: list[str]) -> list[str]:
    return [f"obs/{n}" for n in names]


def ours_loader(spec: dict) -> dict:
    from protege.datasets.loader import WindowIndexStream, batch_iterator, load_buffer
    from protege.datasets.sampler import SequenceSampler

    t0 = time.perf_counter()
    keys = our_obs_keys(spec["obs"])
    clock = StepClock(spec["seconds"], warmup=2)
    with PeakRSS() as rss:
        buffer, in_memory = load_buffer(spec["buffer"], [*keys, "action"])
        sampler = SequenceSampler(buffer, keys, spec["n_obs_steps"], spec["horizon"])
        stream = WindowIndexStream(len(sampler), spec["batch_size"], seed=0)
        batches = batch_iterator(sampler, stream, streaming=not in_memory, num_workers=spec["workers"])
        setup_s = time.perf_counter() - t0
        while not clock.done:
            batch = next(batches)
            clock.tick()
    return {**clock.result(spec["batch_size"]), "peak_rss_mb": rss.peak / 2**20, "setup_s": setup_s, "in_memory": in_memory,
            "shapes": {k: list(v.shape) for k, v in batch.items()}}


def our_overrides(spec: dict) -> list[str]:
    p = spec["policy"]
    keys = our_obs_keys(spec["obs"])
    task = "aloha_transfer_cube" if "top" in spec["obs"] else "aloha_transfer_cube_state"
    o = [f"task={task}", f"dataset={spec['buffer']}", f"task.obs_keys=[{','.join(keys)}]", "device=cpu"]
    if p["type"] == "act":
        o += ["policy=act", f"policy.chunk_size={p['chunk_size']}", f"policy.n_action_steps={p['chunk_size']}",
              f"policy.hidden_dim={p['hidden_dim']}", f"policy.n_heads={p['n_heads']}",
              f"policy.dim_feedforward={p['dim_feedforward']}", f"policy.n_encoder_layers={p['n_encoder_layers']}",
              f"policy.n_decoder_layers={p['n_decoder_layers']}", f"policy.n_vae_encoder_layers={p['n_vae_encoder_layers']}",
              f"policy.latent_dim={p['latent_dim']}", "policy.backbone=resnet18",
              "train.lr=1e-5", "train.weight_decay=1e-4"]  # ACT's optimiser settings, as LeRobot's preset
    else:
        o += ["policy=diffusion", f"policy.down_dims=[{','.join(map(str, p['down_dims']))}]", f"policy.horizon={p['horizon']}",
              f"policy.n_obs_steps={p['n_obs_steps']}", f"policy.n_action_steps={p['n_action_steps']}",
              f"policy.kernel_size={p['kernel_size']}", f"policy.n_groups={p['n_groups']}",
              f"policy.step_embed_dim={p['step_embed_dim']}", f"policy.num_train_timesteps={p['num_train_timesteps']}",
              "policy.inference_scheduler=ddim", f"policy.num_inference_steps={p['num_inference_steps']}", "train.lr=1e-4"]
    return o + list(spec.get("extra", []))


def ours_train(spec: dict) -> dict:
    """protege's trainer (`protege train`), timed at every optimiser step and stopped after the measuring time."""
    import torch

    from protege.cli import compose
    from protege.policies.base import Policy
    from protege.training.trainer import train

    torch.set_num_threads(spec["threads"])
    run_dir = tempfile.mkdtemp(prefix="compare-ours-", dir=spec.get("tmp"))
    cfg = compose("train", [*our_overrides(spec), f"run_dir={run_dir}", f"train.batch_size={spec['batch_size']}",
                            "train.steps=1000000000", "train.val_ratio=0", "train.val_every=0", "train.ckpt_every=0",
                            "train.log_every=1000000", "eval.n_episodes=0"])
    clock = StepClock(spec["seconds"], warmup=spec["warmup"], raise_when_done=True)
    hook, info = Policy.on_train_step, {}

    def timed(self: Policy) -> None:
        hook(self)
        info.setdefault("params", sum(p.numel() for p in self.parameters()))
        clock.tick()

    Policy.on_train_step = timed
    with PeakRSS() as rss:
        try:
            train(cfg, progress=False)
        except StopMeasuring:
            pass
    shutil.rmtree(run_dir, ignore_errors=True)
    return {**clock.result(spec["batch_size"]), "peak_rss_mb": rss.peak / 2**20, "params": info.get("params"),
            "amp": cfg.train.amp}


def ours_infer(spec: dict) -> dict:
    """Batch-1 latency of one chunk: `predict_action` as `protege eval` / `protege run` call it
    (Diffusion Policy's DDIM loop through the exported runtime, `policy.accelerate`)."""
    import numpy as np
    import torch

    from protege.cli import compose
    from protege.datasets.loader import load_buffer
    from protege.policies.base import build_policy, shape_meta_from_buffer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    keys = our_obs_keys(spec["obs"])
    buffer, _ = load_buffer(spec["buffer"], [*keys, "action"])
    cfg = compose("train", our_overrides(spec))
    policy = build_policy(cfg.policy, shape_meta_from_buffer(buffer, keys))
    policy.normalizer.fit({k: buffer.data[k] for k, st in policy.normalizer.stats.items() if st.mode != "identity"})
    policy.eval()
    # as `protege eval` / `protege run` load a checkpoint: inference through the exported runtime
    export_dir = tempfile.mkdtemp(prefix="compare-export-", dir=spec.get("tmp"))
    runtime = policy.accelerate(export_dir, spec.get("runtime", "auto"))
    obs = {k: torch.from_numpy(np.asarray(buffer.data[k][: policy.n_obs_steps]))[None] for k in keys}
    with PeakRSS() as rss, torch.inference_mode():
        res = latency(lambda: policy.predict_action(obs), spec["seconds"])
        shape = list(policy.predict_action(obs).shape)
    shutil.rmtree(export_dir, ignore_errors=True)
    return {**res, "peak_rss_mb": rss.peak / 2**20, "chunk_shape": shape, "runtime": runtime,
            "params": sum(p.numel() for p in policy.parameters())}


OUR_JOBS = {"loader": ours_loader, "train": ours_train, "infer": ours_infer}


# ----------------------------------------------------------------------------- driver
def ratio(a: dict, b: dict, key: str, higher_is_better: bool = True) -> float:
    return a[key] / b[key] if higher_is_better else b[key] / a[key]


def headline(rows: dict[str, dict]) -> str:
    def x(name: str) -> str:
        return f"{rows[name]['x']:.2f}" if name in rows else "nan"

    loaders = [rows[n]["x"] for n in ("loader_state", "loader_camera") if n in rows]
    loader = f"{min(loaders):.2f}" if loaders else "nan"
    return (f"loader_x={loader} act_train_x={x('act_train')} dp_train_x={x('dp_train')} "
            f"dp_infer_x={x('dp_infer')} act_infer_x={x('act_infer')}")


def table(rows: dict[str, dict]) -> str:
    lines = ["| measurement | protege | LeRobot | ours / theirs | peak RSS ours / theirs (MB) |", "|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['label']} | {r['ours_fmt']} | {r['theirs_fmt']} | **{r['x']:.2f}×** | "
                     f"{r['ours']['peak_rss_mb']:.0f} / {r['theirs']['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--lerobot", default="lerobot", help="pip requirement for the venv (e.g. lerobot==0.4.4)")
    ap.add_argument("--work", type=Path, default=Path("runs/compare_lerobot"), help="datasets and logs (reused)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default <work>/compare_lerobot.json)")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20.0, help="measuring wall time per side and item")
    ap.add_argument("--rounds", type=int, default=1, help="ours/theirs pairs per item (order flips every round)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")), help="torch threads, both sides")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (LeRobot's loader and training)")
    ap.add_argument("--loader-batch", type=int, default=64)
    ap.add_argument("--act-batch", type=int, default=8)
    ap.add_argument("--dp-batch", type=int, default=64)
    ap.add_argument("--dp-dims", default="128,256,512", help="U-Net down_dims, both sides")
    ap.add_argument("--only", default="", help="comma-separated items: loader_state,loader_camera,act_train,dp_train,act_infer,dp_infer")
    ap.add_argument("--ours-extra", default="", help="extra hydra overrides for our training, comma-separated (e.g. train.amp=bf16)")
    ap.add_argument("--ours", default=None, help=argparse.SUPPRESS)  # internal: run one of our jobs
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ours:
        real_stdout, sys.stdout = sys.stdout, sys.stderr
        result = OUR_JOBS[a.ours](json.loads(a.spec))
        real_stdout.write(json.dumps(result) + "\n")
        return

    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "workers.log"
    out = a.out or work / "compare_lerobot.json"
    version = ensure_venv(a.venv, a.lerobot)
    ffmpeg = ensure_ffmpeg()
    print(f"LeRobot {version} in {a.venv}; system FFmpeg: {ffmpeg}", flush=True)

    # ---- 1. datasets written by LeRobot, converted by protege
    data: dict[str, Any] = {}
    for name, camera in (("lerobot_camera", True), ("lerobot_state", False)):
        root = work / name
        info = root / "meta" / "info.json"
        if not (info.exists() and json.loads(info.read_text()).get("total_episodes") == a.episodes
                and json.loads(info.read_text()).get("total_frames") == a.episodes * a.steps):
            shutil.rmtree(root, ignore_errors=True)
            data[name] = theirs(a.venv, "write", {"root": str(root), "camera": camera, "episodes": a.episodes, "steps": a.steps}, log)
            print(f"wrote {root} with LeRobotDataset.create/add_frame/save_episode in {data[name]['seconds']:.0f} s", flush=True)
    buffer = work / "protege.zarr"
    marker = work / "protege.zarr.done"
    if not marker.exists() or marker.read_text() != str(a.episodes * a.steps):
        shutil.rmtree(buffer, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "protege.cli", "convert", str(work / "lerobot_camera"), str(buffer)], check=True,
                       env=with_repo_path(),
                       stdout=subprocess.DEVNULL)
        data["convert_s"] = time.perf_counter() - t0
        marker.write_text(str(a.episodes * a.steps))
        print(f"protege convert -> {buffer} in {data['convert_s']:.0f} s", flush=True)

    # ---- 2. measurements
    common = {"seconds": a.seconds, "threads": a.threads, "workers": a.workers, "tmp": str(work)}
    dp = {**DP, "down_dims": [int(d) for d in a.dp_dims.split(",")]}
    extra = [o for o in a.ours_extra.split(",") if o]
    window = {"n_obs_steps": 2, "horizon": 16, "batch_size": a.loader_batch}
    items: dict[str, tuple[str, str, dict, dict, str]] = {
        # name: (label, job, our spec, their spec, unit)
        "loader_state": ("loader, windows/s (2 obs + 16 actions, state + env state)", "loader",
                         {**window, "obs": ["state", "environment_state"]},
                         {**window, "root": str(work / "lerobot_state"), "camera": False}, "windows/s"),
        "loader_camera": ("loader, windows/s (same + 2 camera frames 96×128)", "loader",
                          {**window, "obs": ["state", "environment_state", "top"]},
                          {**window, "root": str(work / "lerobot_camera"), "camera": True}, "windows/s"),
        "act_train": (f"ACT training, samples/s (ResNet-18, hidden 512, chunk 100, batch {a.act_batch}, camera)", "train",
                      {"obs": ["state", "top"], "policy": ACT, "batch_size": a.act_batch, "warmup": 3, "extra": extra},
                      {"obs": ["state", "top"], "policy": ACT, "batch_size": a.act_batch, "warmup": 3,
                       "root": str(work / "lerobot_camera")}, "samples/s"),
        "dp_train": (f"Diffusion Policy training, samples/s (U-Net {a.dp_dims}, horizon 16, batch {a.dp_batch}, state + env state)",
                     "train", {"obs": ["state", "environment_state"], "policy": dp, "batch_size": a.dp_batch, "warmup": 3, "extra": extra},
                     {"obs": ["state", "environment_state"], "policy": dp, "batch_size": a.dp_batch, "warmup": 3,
                      "root": str(work / "lerobot_state")}, "samples/s"),
        "dp_infer": ("Diffusion Policy inference, ms per chunk (batch 1, DDIM 10 steps)", "infer",
                     {"obs": ["state", "environment_state"], "policy": dp},
                     {"obs": ["state", "environment_state"], "policy": dp, "root": str(work / "lerobot_state")}, "ms"),
        "act_infer": ("ACT inference, ms per 100-action chunk (batch 1, camera)", "infer",
                      {"obs": ["state", "top"], "policy": ACT}, {"obs": ["state", "top"], "policy": ACT,
                                                                  "root": str(work / "lerobot_camera")}, "ms"),
    }
    wanted = [w for w in a.only.split(",") if w]
    rows: dict[str, dict] = {}
    results: dict[str, Any] = {"lerobot": version, "system_ffmpeg": ffmpeg, "datasets": data, "args": {k: str(v) for k, v in vars(a).items()},
                               "items": {}}
    for name, (label, job, our_spec, their_spec, unit) in items.items():
        if wanted and name not in wanted:
            continue
        our_spec = {**common, **our_spec, "buffer": str(buffer)}
        their_spec = {**common, **their_spec}
        runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
        for r in range(a.rounds):
            order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
            for side in order:
                res = ours(job, our_spec, log) if side == "ours" else theirs(a.venv, job, their_spec, log)
                runs[side].append(res)
                value = res.get("per_s", res.get("median_ms"))
                print(f"{name:14s} {side:6s} {value:10.2f} {unit}  (peak RSS {res['peak_rss_mb']:.0f} MB)", flush=True)
        # several rounds: the median run of each side
        pick = lambda rs, k: sorted(rs, key=lambda x: x[k])[len(rs) // 2]  # noqa: E731
        key = "median_ms" if job == "infer" else "per_s"
        o, t = pick(runs["ours"], key), pick(runs["theirs"], key)
        x = ratio(o, t, key, higher_is_better=job != "infer")
        fmt = (lambda v: f"{v[key]:.1f} ms") if job == "infer" else (lambda v: f"{v[key]:.1f}")
        rows[name] = {"label": label, "ours": o, "theirs": t, "x": x, "ours_fmt": fmt(o), "theirs_fmt": fmt(t)}
        results["items"][name] = {"label": label, "x": x, "ours": runs["ours"], "theirs": runs["theirs"]}
        out.write_text(json.dumps(results, indent=2))
    results["headline"] = headline(rows)
    results["loadavg_1min"] = os.getloadavg()[0]
    out.write_text(json.dumps(results, indent=2))
    print()
    print(f"LeRobot {version} vs protege, {a.threads} torch thread(s), {a.workers} DataLoader workers on LeRobot's side, "
          f"{a.seconds:.0f} s per side and item; full results in {out}")
    print()
    print(table(rows))
    print()
    print(results["headline"])


if __name__ == "__main__":
    main()
