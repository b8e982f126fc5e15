"""Timing statistics of a run and the report built from them (`runner.json`, the printed summary)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protege.runtime.settings import EXIT_CODES


LATE_WAKE_S = 5e-4  # a tick woken later than this counts as a late wake (the jitter goal is p99 < 0.5 ms)


@dataclass
class LoopStats:
    """What the loop measures; times in seconds on the robot's clock."""

    wake: list[float] = field(default_factory=list)  # when each tick woke
    scheduled: list[float] = field(default_factory=list)  # when it should have
    periods: list[float] = field(default_factory=list)  # wake-to-wake within an episode
    latency: list[float] = field(default_factory=list)  # inference calls inside episodes
    first_latency: list[float] = field(default_factory=list)  # each episode's synchronous first chunk
    ticks: int = 0
    deadline_misses: int = 0  # ticks without an action because the policy was late
    overruns: int = 0  # ticks that ended after the next one was due
    stale_actions_dropped: int = 0
    missing_frames: int = 0  # ticks whose observation lacked a camera frame
    stale_frames: int = 0  # ticks whose camera frame was older than max_frame_age
    frame_age: list[float] = field(default_factory=list)  # age of every camera frame read (s)
    miss_causes: Counter = field(default_factory=Counter)  # why the policy was late
    late_wakes: Counter = field(default_factory=Counter)  # ticks woken > LATE_WAKE_S late, by likely cause
    gc_pauses: list[float] = field(default_factory=list)  # Python GC collections during the run (s)


def _ms(x: np.ndarray, q: float) -> float | None:
    return float(np.percentile(x, q) * 1e3) if len(x) else None


def timing_report(st: LoopStats, realtime: bool) -> dict[str, Any]:
    periods = np.array(st.periods) if realtime else np.array([])
    jitter = np.abs(np.array(st.wake) - np.array(st.scheduled)) if realtime else np.array([])
    lat = np.array(st.latency)
    return {
        "ticks": st.ticks,
        "period_ms_p50": _ms(periods, 50), "period_ms_p99": _ms(periods, 99),
        "jitter_ms_p50": _ms(jitter, 50), "jitter_ms_p99": _ms(jitter, 99),
        "jitter_ms_max": float(jitter.max() * 1e3) if len(jitter) else None,
        "inference_ms_median": _ms(lat, 50), "inference_ms_p99": _ms(lat, 99), "n_inferences": int(len(lat)),
        "first_chunk_ms_max": float(np.max(st.first_latency) * 1e3) if st.first_latency else None,
        "deadline_misses": st.deadline_misses, "overruns": st.overruns,
        "deadline_miss_rate": (st.deadline_misses + st.overruns) / st.ticks if st.ticks else 0.0,
        "stale_actions_dropped": st.stale_actions_dropped,
        "missing_frames": st.missing_frames, "stale_frames": st.stale_frames,
        "frame_age_ms_p50": _ms(np.array(st.frame_age), 50), "frame_age_ms_p99": _ms(np.array(st.frame_age), 99),
        "miss_causes": dict(st.miss_causes), "late_wakes": dict(st.late_wakes),
        "gc_collections": len(st.gc_pauses), "gc_pause_ms_max": float(max(st.gc_pauses) * 1e3) if st.gc_pauses else 0.0,
    }


def build_report(status: str, message: str, stats: LoopStats, robot: Any, rate_hz: float, episodes: list[dict[str, Any]],
                 has_task: bool, **extra: Any) -> dict[str, Any]:
    """The run's report: how it ended, per-episode results, timing, and `extra` entries
    (temporal_ensemble, safety_interventions, recording, ...) in that order."""
    realtime = robot.clock.realtime
    succ = [e["success"] for e in episodes]
    report = {
        "status": status, "exit_code": EXIT_CODES.get(status, 1), "message": message,
        "robot": robot.name, "realtime": realtime, "rate_hz": rate_hz,
        "episodes": episodes,
        "success_rate": float(np.mean(succ)) if succ and has_task else None,
        **timing_report(stats, realtime),
        **extra,
    }
    if hasattr(robot, "diagnostics"):  # e.g. the Franka's 1 kHz loop: cycles, gaps, errors
        report["robot_diagnostics"] = robot.diagnostics()
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    from protege.fileio import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "runner.json", report)
    report["json"] = str(out_dir / "runner.json")


def format_report(r: dict[str, Any]) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        f"run: {r['status']} (exit {r['exit_code']}): {r['message']}",
        f"  robot {r['robot']} at {r['rate_hz']:g} Hz ({'real time' if r['realtime'] else 'simulated time'}), "
        f"{r['ticks']} ticks, {len(r['episodes'])} episode(s), success_rate {f(r['success_rate'])}",
        f"  loop period p50/p99 {f(r['period_ms_p50'])}/{f(r['period_ms_p99'])} ms, jitter p99 {f(r['jitter_ms_p99'])} ms "
        f"(max {f(r['jitter_ms_max'])})",
        f"  inference median/p99 {f(r['inference_ms_median'])}/{f(r['inference_ms_p99'])} ms over {r['n_inferences']} calls "
        f"(+ each episode's first chunk, max {f(r['first_chunk_ms_max'])} ms); "
        f"deadline misses {r['deadline_misses']}, overruns {r['overruns']} (rate {r['deadline_miss_rate']:.4f}); "
        f"stale actions dropped {r['stale_actions_dropped']}",
        *([f"  camera frames: age p50/p99 {f(r['frame_age_ms_p50'])}/{f(r['frame_age_ms_p99'])} ms, "
           f"missing {r['missing_frames']}, too old {r['stale_frames']}"] if r.get("frame_age_ms_p50") is not None else []),
        f"  misses by cause {r['miss_causes'] or 'none'}; late wakes (> 0.5 ms) by cause {r['late_wakes'] or 'none'}; "
        f"GC collections {r['gc_collections']} (max {r['gc_pause_ms_max']:.2f} ms)",
        f"  safety interventions: {r['safety_interventions'] or 'none'}",
    ]
    if r.get("robot_diagnostics"):
        lines.append(f"  robot: {r['robot_diagnostics']}")
    if r.get("recording"):
        lines.append(f"  recording: {r['recording']}")
    if r.get("json"):
        lines.append(f"  stats: {r['json']}")
    return "\n".join(lines)
