"""Real-time runner on the MuJoCo Franka backend (wall-clock pacing, asynchronous inference): loop
period, jitter, deadline misses and inference latency for

- `dp10`, `dp20`: Diffusion Policy (state, CPU config, DDIM-10), 8-step chunks at 10 / 20 Hz;
- `dp50_long_chunks`: Diffusion Policy with 24-step chunks at 50 Hz: inference takes several
  periods, so the next chunk is computed while the current one executes and its stale head is dropped;
- `chunk50_te`: ACT-style: 49-step chunks (an MLP head) with temporal ensembling at 50 Hz, a new
  chunk every step;
- `dp10_thread`: dp10 with inference in a thread instead of a process (side-by-side baseline: the
  policy's Python code then shares the GIL with the control loop);
- `dp50_gc_on`: dp50_long_chunks with Python's cyclic GC allowed inside episodes (`runner.gc_in_episodes`),
  the old behaviour: a side-by-side of one cause of late ticks;
- `cam10`: camera-conditioned Diffusion Policy (ResNet-18 per camera + state, 15-step chunks) at 10 Hz on two
  MuJoCo cameras (`front`, `wrist`) at 96x128, rendered at 20 fps in their own threads from snapshots of the
  simulation (decimated meshes).

Every configuration's deadline misses are attributed (`miss_causes`: no latency measured yet / inference
slower than the planned lead; `late_wakes`: a GC pass since the last tick / OS scheduling), and the table
at the end says which configuration misses. Timing depends on what else runs: the load average before
and after is printed and saved.

Policies are built from the shipped configs with the reach task's shapes and normalizers fitted on
freshly collected expert demos; their weights are untrained (latency does not depend on them, and
the safety layer keeps the arm in its box), or pass `--checkpoint` to time a trained one (as dp10).

    python scripts/bench_runtime.py [--seconds 20] [--out bench_runtime.json]
Last line: deadline_miss_rate=<fraction> p99_jitter_ms=<x> inference_ms=<median> thread_vs_process_p99_jitter=<ratio>
frame_age_p99_ms=<x> (miss rate and jitter over dp10, dp20, dp50_long_chunks and chunk50_te: total misses /
total ticks, worst p99 jitter; median DP inference; camera frame age p99 of cam10).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

import numpy as np

from protege.cli import compose, configure_rendering


def build(policy: str, buffer, *overrides: str):  # noqa: ANN001, ANN202
    from protege.policies import build_policy
    from protege.policies.base import shape_meta_from_buffer

    cfg = compose("train", [f"policy={policy}", *overrides])
    p = build_policy(cfg.policy, shape_meta_from_buffer(buffer, ["obs/state"]))
    p.normalizer.fit({k: np.asarray(buffer[k][:]) for k in ("obs/state", "action")})
    return p.eval()


def build_camera_policy(buffer, cameras: list[str], hw: tuple[int, int]):  # noqa: ANN001, ANN202
    """diffusion_image on state + cameras: shapes declared (the weights are untrained: latency does not
    depend on them), state/action normalizer fitted on the demos."""
    from protege.policies import build_policy

    # 15-step chunks (1.5 s at 10 Hz, the most a 16-step horizon with 2 observation steps holds): two ResNet-18
    # encoders + DDIM-10 took ~1 s per call on a loaded 2-core CPU
    cfg = compose("train", ["policy=diffusion_image", "policy.n_action_steps=15"])
    meta = {"obs/state": {"shape": [int(buffer["obs/state"].shape[1])], "kind": "state"},
            **{f"obs/{c}": {"shape": [*hw, 3], "kind": "image"} for c in cameras},
            "action": {"shape": [int(buffer["action"].shape[1])], "kind": "action"}}
    p = build_policy(cfg.policy, meta)
    p.normalizer.fit({k: np.asarray(buffer[k][:]) for k in ("obs/state", "action")})
    return p.eval()


def summary_table(results: dict) -> str:
    rows = [f"{'config':18s} {'ticks':>6s} {'misses':>6s} {'overruns':>8s} {'p99 jitter ms':>13s} {'late wakes':>22s} "
            f"{'frame age p99':>13s}  miss causes"]
    for name, r in results.items():
        fa = "-" if r["frame_age_ms_p99"] is None else f"{r['frame_age_ms_p99']:.1f}"
        rows.append(f"{name:18s} {r['ticks']:6d} {r['deadline_misses']:6d} {r['overruns']:8d} {r['jitter_ms_p99']:13.3f} "
                    f"{str(r['late_wakes'] or '-'):>22s} {fa:>13s}  {r['miss_causes'] or '-'}")
    missing = [n for n, r in results.items() if r["deadline_misses"] + r["overruns"]]
    rows.append(f"configurations with deadline misses or overruns: {', '.join(missing) or 'none'}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0, help="run length of each configuration")
    ap.add_argument("--checkpoint", help="a trained Franka-reach checkpoint to use as dp10 (default: untrained DP)")
    ap.add_argument("--out", default="bench_runtime.json")
    ap.add_argument("--only", nargs="*", help="run only these configurations (no headline line)")
    args = ap.parse_args()
    configure_rendering()
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("protege.hardware").setLevel(logging.ERROR)  # interventions are counted in the report
    import torch

    # diffusers (-> triton) before mujoco: with MUJOCO_GL=osmesa, importing triton after mujoco has
    # loaded OSMesa segfaults here (two LLVMs in one process)
    import protege.policies.diffusion  # noqa: F401
    from protege.datasets.replay_buffer import ReplayBuffer
    from protege.envs.collect import collect
    from protege.envs.franka import make_task
    from protege.hardware.mujoco_robot import MujocoRobot
    from protege.runtime.runner import Runner, RunnerSettings, format_report
    from protege.training.checkpoint import load_policy

    torch.manual_seed(0)
    load_before = os.getloadavg()
    print(f"load average before (1/5/15 min): {load_before}, {os.cpu_count()} CPUs", flush=True)
    tmp = tempfile.mkdtemp(prefix="bench_runtime_")
    buf = ReplayBuffer.load(collect("franka", {"task": "reach"}, 20, f"{tmp}/reach.zarr", fps=10, progress=False))
    dp = load_policy(args.checkpoint) if args.checkpoint else build("diffusion", buf)
    long_dp = build("diffusion", buf, "policy.horizon=32", "policy.n_action_steps=24")
    act_like = build("bc", buf, "policy.horizon=50", "policy.n_action_steps=49")
    cams, hw = ["front", "wrist"], (96, 128)
    cam_dp = build_camera_policy(buf, cams, hw)
    cam_robot = {c: {"backend": "mujoco", "height": hw[0], "width": hw[1], "fps": 20} for c in cams}
    # name: (policy, rate, temporal ensembling m or None, inference mode, extra settings, robot cameras)
    configs = {
        "dp10_thread": (dp, 10.0, None, "thread", {}, {}),
        "dp10": (dp, 10.0, None, "process", {}, {}),
        "dp20": (dp, 20.0, None, "process", {}, {}),
        "dp50_long_chunks": (long_dp, 50.0, None, "process", {}, {}),
        "dp50_gc_on": (long_dp, 50.0, None, "process", {"gc_in_episodes": True}, {}),
        "chunk50_te": (act_like, 50.0, 0.01, "process", {}, {}),
        "cam10": (cam_dp, 10.0, None, "process", {}, cam_robot),
    }
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    task = make_task("reach")
    results, t_all = {}, time.perf_counter()
    for name, (policy, hz, te, mode, extra, cameras) in configs.items():
        s = RunnerSettings(rate_hz=hz, n_episodes=1, max_steps=int(args.seconds * hz), stop_on_success=False,
                           temporal_ensemble=te, watchdog_timeout=2.0, out_dir=f"{tmp}/{name}", inference=mode, **extra)
        robot = MujocoRobot(realtime=True, cameras=cameras)
        try:
            report = Runner(policy, robot, "ee_delta", task.state_keys, None, task, s).run()
        finally:
            robot.close()
        print(f"[{name}]\n" + format_report(report), flush=True)
        report.pop("episodes")
        results[name] = report
    load_after = os.getloadavg()
    print(summary_table(results))
    print(f"load average after (1/5/15 min): {load_after}")
    if args.only:
        return
    # headline: the target configurations (inference in a process, default settings, no cameras);
    # dp10_thread and dp50_gc_on are side-by-side baselines, cam10 has its own row
    target = {k: results[k] for k in ("dp10", "dp20", "dp50_long_chunks", "chunk50_te")}
    ticks = sum(r["ticks"] for r in target.values())
    misses = sum(r["deadline_misses"] + r["overruns"] for r in target.values())
    headline = {
        "deadline_miss_rate": misses / max(ticks, 1),
        "p99_jitter_ms": max(r["jitter_ms_p99"] for r in target.values()),
        "inference_ms": results["dp10"]["inference_ms_median"],
        "thread_vs_process_p99_jitter": results["dp10_thread"]["jitter_ms_p99"] / max(results["dp10"]["jitter_ms_p99"], 1e-3),
        "frame_age_p99_ms": results["cam10"]["frame_age_ms_p99"],
    }
    out = {"headline": headline, "configs": results, "seconds_per_config": args.seconds,
           "wall_s": time.perf_counter() - t_all, "cpu_count": os.cpu_count(),
           "load_average_before": load_before, "load_average_after": load_after,
           "note": "shared 2-core machine; untrained weights unless --checkpoint" if not args.checkpoint else "shared machine"}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"results: {args.out}")
    print(" ".join(f"{k}={v:.4g}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
