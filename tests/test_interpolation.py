"""The 1 kHz jerk-limited interpolator: whatever the policy targets do (steps, jumps beyond the joint
limits, NaNs, targets that stop or arrive in bursts), the commanded 1 kHz positions stay within the
official position, velocity, acceleration and jerk limits, measured the way the robot measures them:
by finite differences of the commanded positions."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ruckig")

from protege.hardware.interpolation import JerkLimitedInterpolator, JointLimits  # noqa: E402
from protege.hardware.panda import FRANKA_SPECS  # noqa: E402

DT = 1e-3
MID = {m: (FRANKA_SPECS[m]["lower"] + FRANKA_SPECS[m]["upper"]) / 2 for m in FRANKA_SPECS}


def finite_differences(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.diff(q, axis=0) / DT
    a = np.diff(v, axis=0) / DT
    j = np.diff(a, axis=0) / DT
    return v, a, j


def violations(limits: JointLimits, q: np.ndarray) -> dict[str, float]:
    """The largest excess over each official limit (<= 0 everywhere: no violation)."""
    v, a, j = finite_differences(q)
    v_lo, v_hi = limits.velocity_bounds(q[:-1])  # position-dependent bound at the start of each step
    return {
        "position": float(max((q - limits.upper).max(), (limits.lower - q).max())),
        "velocity": float(max((v - v_hi).max(), (v_lo - v).max(), (np.abs(v) - limits.velocity).max())),
        "acceleration": float((np.abs(a) - limits.acceleration).max()),
        "jerk": float((np.abs(j) - limits.jerk).max()),
    }


def run(model: str, targets: dict[int, np.ndarray], n_ms: int, q0: np.ndarray | None = None,
        brake_at: int | None = None) -> tuple[JerkLimitedInterpolator, np.ndarray]:
    """Drive the interpolator for `n_ms` cycles; `targets[k]` arrives at cycle k."""
    limits = JointLimits.from_spec(FRANKA_SPECS[model])
    interp = JerkLimitedInterpolator(limits, MID[model] if q0 is None else q0)
    out = [interp.q.copy()]
    for k in range(1, n_ms + 1):
        if k in targets:
            interp.set_target(targets[k], k * DT)
        if k == brake_at:
            interp.brake()
        out.append(interp.step(k * DT))
    return interp, np.array(out)


def assert_within(model: str, q: np.ndarray) -> dict[str, float]:
    limits = JointLimits.from_spec(FRANKA_SPECS[model])
    excess = violations(limits, q)
    assert all(x <= 1e-9 for x in excess.values()), excess
    return excess


@pytest.mark.parametrize("model", ["fr3", "panda"])
def test_steps_and_jumps_stay_within_limits(model: str) -> None:
    spec, rng = FRANKA_SPECS[model], np.random.default_rng(0)
    targets: dict[int, np.ndarray] = {}
    k = 1
    for _ in range(60):  # 10-50 Hz targets: small steps, big jumps, beyond the limits, straight at a limit
        kind = rng.integers(4)
        if kind == 0:
            q = MID[model] + rng.normal(0, 0.05, 7)
        elif kind == 1:
            q = rng.uniform(spec["lower"], spec["upper"])
        elif kind == 2:
            q = np.where(rng.random(7) < 0.5, spec["lower"] - 1.0, spec["upper"] + 1.0)
        else:
            q = np.where(rng.random(7) < 0.5, spec["lower"], spec["upper"])
        targets[k] = q
        k += int(rng.choice([20, 50, 100]))
    final = rng.uniform(0.8 * spec["lower"] + 0.2 * MID[model], 0.8 * spec["upper"] + 0.2 * MID[model])
    targets.update({k + i: final for i in range(0, 3000, 100)})  # held, as the runner does
    interp, q = run(model, targets, k + 3000)
    assert_within(model, q)
    # it moved where it was sent: every joint swept a good part of its range, and the last target was reached
    assert np.all(np.ptp(q, axis=0) > 0.1 * (spec["upper"] - spec["lower"])), np.ptp(q, axis=0)
    np.testing.assert_allclose(q[-1], final, atol=1e-6)
    assert interp.counts["clipped"] > 0 and interp.counts["planner_retries"] == 0


@pytest.mark.parametrize("model", ["fr3", "panda"])
def test_drives_into_the_position_limits_and_stops_short(model: str) -> None:
    """Targets 1 rad beyond every upper limit, then beyond every lower one, refreshed at 10 Hz: the arm
    runs at speed into each limit and brakes in time (velocity bound shrinking near the limits)."""
    spec = FRANKA_SPECS[model]
    targets = {k: spec["upper"] + 1.0 for k in range(1, 2500, 100)}
    targets.update({k: spec["lower"] - 1.0 for k in range(2501, 7000, 100)})
    interp, q = run(model, targets, 7000)
    assert_within(model, q)
    gap_hi, gap_lo = (spec["upper"] - q[2490]).max(), (q[-1] - spec["lower"]).max()
    assert 0 < gap_hi < 0.06 and 0 < gap_lo < 0.06, (gap_hi, gap_lo)  # close to, never past, the limits
    v, _, _ = finite_differences(q)
    assert np.abs(v).max(axis=0).min() > 0.5  # every joint ran fast on the way (joints arrive together)


def test_tracks_a_steady_stream_of_targets() -> None:
    """10 Hz targets along a slow sine: the command follows them closely, without stop-and-go."""
    t = np.arange(1, 31) * 0.1
    wave = MID["fr3"][None] + 0.2 * np.sin(2 * np.pi * 0.5 * t)[:, None]
    interp, q = run("fr3", {100 * (i + 1): wave[i] for i in range(30)}, 3100)
    assert_within("fr3", q)
    # from the third target on (the first one starts from rest and takes `max_segment`), each target
    # is reached one interval after it was sent, moving: no stop-and-go at every target
    err = np.abs(q[[100 * (i + 2) for i in range(2, 29)]] - wave[2:29]).max()
    assert err < 0.002, err
    speed = np.abs(np.diff(q[400:2900, 0])) / DT
    assert np.sum(speed < 0.05) < 120, np.sum(speed < 0.05)  # slow only near the two turning points
    assert interp.counts["rejected"] == interp.counts["stale"] == 0


def test_nan_and_malformed_targets_are_rejected() -> None:
    q_goal = MID["fr3"] + 0.3
    bad = {300: np.full(7, np.nan), 400: np.r_[q_goal[:6], np.inf], 500: np.ones(6)}
    interp, q = run("fr3", {1: q_goal, **bad}, 1500)
    assert_within("fr3", q)
    assert interp.counts["rejected"] == 3
    np.testing.assert_allclose(q[-1], q_goal, atol=1e-6)  # the bad ones did not move the goal


def test_stale_targets_brake_to_rest_and_resume() -> None:
    """A target that is never refreshed (runner gone) brakes the arm to rest where it is; the next
    target resumes from there; a target after a long silence is interpolated over one segment at most."""
    far = MID["fr3"] + np.array([1.5, 0.8, 1.5, 0.5, 1.5, 0.5, 1.5])
    interp, q = run("fr3", {1: far, **{k: MID["fr3"] for k in range(2000, 4000, 100)}}, 4000)
    assert_within("fr3", q)
    assert interp.counts["stale"] >= 1
    v, _, _ = finite_differences(q)
    # braked before reaching the far target: at rest well short of it around 1.5 s
    assert np.abs(v[1490:1990]).max() < 1e-6
    assert np.abs(q[1500] - far).max() > 0.1
    np.testing.assert_allclose(q[-1], MID["fr3"], atol=1e-6)  # resumed, reached the new target


def test_brake_from_full_speed_and_lost_cycles() -> None:
    """brake() from a fast motion stops within the limits and rejects later targets; a cycle
    skipped by the loop (robot time jumps 3 ms) stays on the planned trajectory."""
    spec = FRANKA_SPECS["fr3"]
    limits = JointLimits.from_spec(spec)
    interp = JerkLimitedInterpolator(limits, MID["fr3"])
    interp.set_target(spec["upper"], 0.0)
    qs, ts, t = [interp.q.copy()], [0.0], 0.0
    for k in range(600):
        t += 3 * DT if k == 150 else DT
        if k == 300:
            interp.brake()
            assert not interp.set_target(spec["lower"], t)
        qs.append(interp.step(t))
        ts.append(t)
    assert interp.at_rest
    # the commanded trajectory, resampled at 1 ms (the skipped cycles were planned, not dropped)
    assert ts[151] - ts[150] == pytest.approx(3 * DT)
    q = np.array(qs)
    assert_within("fr3", q[:151])
    assert_within("fr3", q[151:])
    assert np.abs(q[150] - q[151]).max() < 3 * DT * limits.velocity.max()


def test_the_check_catches_a_rate_limited_but_jerky_sequence() -> None:
    """The test's own yardstick can fail: a velocity/acceleration-limited ramp (what the old
    interpolator did) exceeds the FR3 jerk limit at its corners."""
    limits = JointLimits.from_spec(FRANKA_SPECS["fr3"])
    a = 0.9 * limits.acceleration[0]
    v = np.r_[np.arange(0, 1.0, a * DT), np.full(200, 1.0)]  # acceleration switches on and off at once
    q = MID["fr3"][None] + np.cumsum(v)[:, None] * DT * np.eye(7)[0]
    excess = violations(limits, q)
    assert excess["jerk"] > 0 and excess["acceleration"] <= 0 and excess["velocity"] <= 0


def test_fr3_limits_are_the_datasheets() -> None:
    fr3, panda = FRANKA_SPECS["fr3"], FRANKA_SPECS["panda"]
    assert np.all(fr3["acceleration"] == 10.0) and np.all(fr3["jerk"] == 5000.0)
    assert panda["acceleration"][5] == panda["acceleration"][6] == 20.0  # Panda allows more: not FR3's table
    lim = JointLimits.from_spec(fr3)
    lo, hi = lim.velocity_bounds(fr3["upper"])  # at the upper limit: no further motion up
    assert np.all(hi <= 0.06) and np.all(lo < -0.5)
    lo, hi = lim.velocity_bounds((fr3["upper"] + fr3["lower"]) / 2)
    np.testing.assert_allclose(hi, fr3["velocity"])


def test_no_position_plan_brakes_on_the_velocity_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    """When Ruckig finds no position plan in a cycle (all retries fail), the arm brakes smoothly on the
    velocity interface instead of raising, and plans toward the target again once it can."""
    from ruckig import ControlInterface

    limits = JointLimits.from_spec(FRANKA_SPECS["fr3"])
    interp = JerkLimitedInterpolator(limits, MID["fr3"])
    interp.set_target(MID["fr3"] + 0.5, 0.0)
    plan = interp._plan
    failing = {"on": False}

    def position_fails() -> bool:
        if failing["on"] and interp._inp.control_interface == ControlInterface.Position:
            return False
        return plan()

    monkeypatch.setattr(interp, "_plan", position_fails)
    qs = [interp.q.copy()]
    for k in range(1, 3001):
        failing["on"] = 300 <= k < 800  # cruising at k=300: 500 ms without a position plan
        if k % 100 == 0:  # the policy keeps sending the target (else it would go stale and hold)
            interp.set_target(MID["fr3"] + 0.5, k * DT)
        qs.append(interp.step(k * DT))
        if k == 799:
            speed_before_recovery = np.abs(interp.v).max()
    q = np.array(qs)
    assert_within("fr3", q)
    assert interp.counts["planner_retries"] == 500
    assert speed_before_recovery < 1e-3  # braked to rest meanwhile
    np.testing.assert_allclose(q[-1], MID["fr3"] + 0.5, atol=1e-6)  # then reached the target
