"""ALOHA bimanual tasks: scripted-expert success over many seeds, env speed state-only vs with
cameras (measured side by side in one run), and collection throughput with the default camera.

    python scripts/bench_aloha.py [--seeds 50] [--speed-steps 400] [--collect-episodes 3] [--out bench_aloha.json]
Last line: key=value headline figures (expert success per task, steps/s, collection episodes/min).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from protege.cli import configure_rendering  # noqa: E402

configure_rendering()  # before mujoco is imported

from protege.envs import make_env, make_expert  # noqa: E402
from protege.envs.collect import collect, run_expert_episode  # noqa: E402

TASKS = ("aloha_transfer_cube", "aloha_insertion")


def expert_success(env_id: str, seeds: range) -> dict:
    env = make_env(env_id)
    expert = make_expert(env_id, env, seed=0)
    t0 = time.perf_counter()
    results = []
    for s in seeds:
        _, ok = run_expert_episode(env, expert, s)
        results.append({"seed": s, "success": ok, "max_stage": env.unwrapped.max_stage})
    dt = time.perf_counter() - t0
    return {"success_rate": float(np.mean([r["success"] for r in results])), "n": len(results),
            "failed_seeds": [r["seed"] for r in results if not r["success"]], "s_per_episode": dt / len(results),
            "episodes": results}


def env_speed(env_id: str, cameras: tuple[str, ...], image_size: tuple[int, int], n_steps: int, **kw) -> float:
    """Env steps/s replaying the expert's joint targets (planning excluded)."""
    env = make_env(env_id, cameras=cameras, image_size=image_size, **kw)
    expert = make_expert(env_id, env)
    obs, _ = env.reset(seed=0)
    actions = [expert(obs)]  # plans the whole episode
    plan = expert.plan
    env.step(actions[0])  # first render creates the GL context: not timed
    t0 = time.perf_counter()
    for t in range(n_steps):
        env.step(plan[(t + 1) % len(plan)])
    return n_steps / (time.perf_counter() - t0)


def expert_plan_time(env_id: str, n: int = 5) -> float:
    env = make_env(env_id)
    expert = make_expert(env_id, env)
    t0 = time.perf_counter()
    for s in range(n):
        obs, _ = env.reset(seed=s)
        expert.reset()
        expert(obs)
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--speed-steps", type=int, default=400)
    p.add_argument("--collect-episodes", type=int, default=3)
    p.add_argument("--out", default="bench_aloha.json")
    args = p.parse_args()
    res: dict = {"note": "2-core CPU shared with other jobs: absolute times are inflated, compare ratios"}
    for env_id in TASKS:
        r = res[env_id] = {}
        r["expert"] = expert_success(env_id, range(args.seeds))
        r["expert_plan_s"] = expert_plan_time(env_id)
        speeds = r["steps_per_s"] = {}
        for label, cams, size, kw in [
                ("state_only", (), (96, 128), {}), ("top_96x128", ("top",), (96, 128), {}),
                ("top_96x128_full_meshes", ("top",), (96, 128), {"render_max_faces": None}),
                ("top_240x320", ("top",), (240, 320), {}),
                ("top+2wrist_96x128", ("top", "left_wrist", "right_wrist"), (96, 128), {})]:
            speeds[label] = env_speed(env_id, cams, size, args.speed_steps, **kw)
        print(env_id, json.dumps({k: v for k, v in r.items() if k != "expert"} | {"success": r["expert"]["success_rate"]}), flush=True)
    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        collect("aloha_transfer_cube", {"cameras": ["top"], "image_size": [96, 128]}, args.collect_episodes,
                tmp / "tc.zarr", fps=50, progress=False)
        res["collect_top_96x128_episodes_per_min"] = args.collect_episodes / (time.perf_counter() - t0) * 60
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    tc, ins = res["aloha_transfer_cube"], res["aloha_insertion"]
    print(f"transfer_cube_expert_success={tc['expert']['success_rate']:.3f} insertion_expert_success="
          f"{ins['expert']['success_rate']:.3f} n_seeds={args.seeds} "
          f"steps_per_s_state={tc['steps_per_s']['state_only']:.0f} steps_per_s_top96x128={tc['steps_per_s']['top_96x128']:.0f} "
          f"steps_per_s_top96x128_full_meshes={tc['steps_per_s']['top_96x128_full_meshes']:.0f} "
          f"steps_per_s_top240x320={tc['steps_per_s']['top_240x320']:.0f} "
          f"collect_eps_per_min={res['collect_top_96x128_episodes_per_min']:.1f}")


if __name__ == "__main__":
    main()
