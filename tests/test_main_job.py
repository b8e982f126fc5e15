"""The README's main job end to end: `protege train` with no arguments (slow: ~8 min on 2 cores)."""

import json
import subprocess
import time

import pytest


@pytest.mark.slow
def test_main_job_default_reaches_80_percent_on_push(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run(["protege", "train", f"run_dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=20 * 60)
    minutes = (time.perf_counter() - t0) / 60
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert summary["n_episodes"] >= 50
    assert summary["success_rate"] >= 0.8, summary["success_rate"]
    assert "success_rate=" in proc.stdout
    assert minutes <= 15, minutes
