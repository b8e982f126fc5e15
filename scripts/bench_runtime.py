"""Real-time runner on the MuJoCo Franka backend (wall-clock pacing, asynchronous inference): loop
period, jitter, deadline misses and inference latency for

- `dp10`, `dp20`: Diffusion Policy (state, CPU config, DDIM-10), 8-step chunks at 10 / 20 Hz;
- `dp50_long_chunks`: Diffusion Policy with 24-step chunks at 50 Hz: inference takes several
  periods, so the next chunk is computed while the current one executes and its stale head is dropped;
- `chunk50_te`: ACT-style: 49-step chunks (an MLP head) with temporal ensembling at 50 Hz, a new
  chunk every step;
- `dp10_thread`: dp10 with inference in a thread instead of a process (side-by-side baseline: the
  policy's Python code then shares the GIL with the control loop).

Policies are built from the shipped configs with the reach task's shapes and normalizers fitted on
freshly collected expert demos; their weights are untrained (latency does not depend on them, and
the safety layer keeps the arm in its box), or pass `--checkpoint` to time a trained one (as dp10).

    python scripts/bench_runtime.py [--seconds 20] [--out bench_runtime.json]
Last line: deadline_miss_rate=<fraction> p99_jitter_ms=<x> inference_ms=<median> thread_vs_process_p99_jitter=<ratio>
(over the process-inference configurations: total misses / total ticks, worst p99 jitter; median DP inference).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0, help="run length of each configuration")
    ap.add_argument("--checkpoint", help="a trained Franka-reach checkpoint to use as dp10 (default: untrained DP)")
    ap.add_argument("--out", default="bench_runtime.json")
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
    tmp = tempfile.mkdtemp(prefix="bench_runtime_")
    buf = ReplayBuffer.load(collect("franka", {"task": "reach"}, 20, f"{tmp}/reach.zarr", fps=10, progress=False))
    dp = load_policy(args.checkpoint) if args.checkpoint else build("diffusion", buf)
    long_dp = build("diffusion", buf, "policy.horizon=32", "policy.n_action_steps=24")
    act_like = build("bc", buf, "policy.horizon=50", "policy.n_action_steps=49")
    # name: (policy, rate, temporal ensembling m or None, inference mode)
    configs = {
        "dp10_thread": (dp, 10.0, None, "thread"),
        "dp10": (dp, 10.0, None, "process"),
        "dp20": (dp, 20.0, None, "process"),
        "dp50_long_chunks": (long_dp, 50.0, None, "process"),
        "chunk50_te": (act_like, 50.0, 0.01, "process"),
    }
    task = make_task("reach")
    results, t_all = {}, time.perf_counter()
    for name, (policy, hz, te, mode) in configs.items():
        s = RunnerSettings(rate_hz=hz, n_episodes=1, max_steps=int(args.seconds * hz), stop_on_success=False,
                           temporal_ensemble=te, watchdog_timeout=2.0, out_dir=f"{tmp}/{name}", inference=mode)
        report = Runner(policy, MujocoRobot(realtime=True), "ee_delta", task.state_keys, [], task, s).run()
        print(f"[{name}]\n" + format_report(report), flush=True)
        report.pop("episodes")
        results[name] = report
    # headline: the target configurations (inference in a process); dp10_thread is the side-by-side baseline
    target = {k: v for k, v in results.items() if configs[k][3] == "process"}
    ticks = sum(r["ticks"] for r in target.values())
    misses = sum(r["deadline_misses"] + r["overruns"] for r in target.values())
    headline = {
        "deadline_miss_rate": misses / max(ticks, 1),
        "p99_jitter_ms": max(r["jitter_ms_p99"] for r in target.values()),
        "inference_ms": results["dp10"]["inference_ms_median"],
        "thread_vs_process_p99_jitter": results["dp10_thread"]["jitter_ms_p99"] / max(results["dp10"]["jitter_ms_p99"], 1e-3),
    }
    out = {"headline": headline, "configs": results, "seconds_per_config": args.seconds,
           "wall_s": time.perf_counter() - t_all, "cpu_count": os.cpu_count(),
           "note": "shared 2-core machine; untrained weights unless --checkpoint" if not args.checkpoint else "shared machine"}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"results: {args.out}")
    print(" ".join(f"{k}={v:.4g}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
