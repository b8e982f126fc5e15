"""Pure helpers of scripts/compare_lerobot.py (the comparison itself needs the LeRobot venv: not run here)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from _lerobot_side import FPS, StepClock, loader_deltas, synthetic_episode  # noqa: E402
from compare_lerobot import headline  # noqa: E402


def test_lerobot_deltas_match_our_window():
    # our window: n_obs_steps observations ending at the current step, horizon actions from the first one
    d = loader_deltas(2, 16, camera=True)
    assert d["observation.state"] == d["observation.images.top"] == [-1 / FPS, 0.0]
    assert np.allclose(np.asarray(d["action"]) * FPS, np.arange(-1, 15))
    assert "observation.images.top" not in loader_deltas(2, 16, camera=False)


def test_synthetic_episode_is_deterministic_and_learnable():
    a, b = synthetic_episode(3, 20), synthetic_episode(3, 20)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(a["action"][:-1], a["state"][1:])  # the action is the next joint position
    assert a["top"].shape == (20, 96, 128, 3) and a["top"].dtype == np.uint8


def test_step_clock_and_headline():
    c = StepClock(0.0, warmup=1)
    for _ in range(4):
        c.tick()
    r = c.result(8)
    assert r["steps"] == 2 and r["per_s"] > 0
    rows = {"loader_state": {"x": 20.0}, "loader_camera": {"x": 12.0}, "act_train": {"x": 1.5}}
    assert headline(rows) == "loader_x=12.00 act_train_x=1.50 dp_train_x=nan dp_infer_x=nan act_infer_x=nan"
