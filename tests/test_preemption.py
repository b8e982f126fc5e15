"""Preemption-safe training: a signalled run checkpoints where it stopped and resumes exactly."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from protege.cli import main
from protege.envs.collect import collect
from protege.training import checkpoint as ckpt
from protege.training.preemption import StopSignal


def test_first_signal_is_recorded_and_a_second_ctrl_c_stops_at_once():
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (not `nohup &`)
    try:
        stop = StopSignal()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM  # recorded, nothing raised: the step goes on
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        finally:
            stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the OMP_NUM_THREADS=1 subprocess
    yield
    torch.set_num_threads(n)


def final_state(run_dir) -> tuple[dict, dict]:
    ck = ckpt.resolve_checkpoint(run_dir)
    return torch.load(ck / "train_state.pt", weights_only=True), load_file(ck / "model.safetensors")


# SIGTERM is what SLURM and cloud preemption send; Ctrl-C takes the same path (slow: a second ~20 s run)
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM])
def test_signalled_run_checkpoints_and_its_resume_command_reproduces_the_uninterrupted_run(tmp_path, one_thread, signum):
    data = tmp_path / "pm.zarr"
    collect("pointmass", {"max_episode_steps": 80}, 6, data, fps=10, seed=0, progress=False)
    args = ["task=pointmass", "policy=bc", "policy.hidden_dims=[32,32]", f"dataset={data}", "eval.n_episodes=0",
            "train.steps=100000", "train.ckpt_every=50", "train.batch_size=16", "train.log_every=1000", "train.val_every=0"]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "protege.cli", "train", *args, f"run_dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"},
                            # Ctrl-C as in a terminal, even when the tests run in the background (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step_00000050").exists():  # mid-run: past its first checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:] if proc.poll() else "timeout"
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    stopped, _ = final_state(run)
    k = int(stopped["step"])
    assert 50 < k < 100000 and f"stopped at step {k}" in stdout
    command = stdout.split("continue with:\n")[1].strip()
    assert command.endswith("resume=true") and f"run_dir={run}" in command

    # the printed command, run to a common end point, against one uninterrupted run
    end = f"train.stop_at={k + 25}"
    assert main([*shlex.split(command)[1:], end]) == 0
    assert main(["train", *args, f"run_dir={tmp_path / 'ref'}", end]) == 0
    (resumed, resumed_ema), (ref, ref_ema) = final_state(run), final_state(tmp_path / "ref")
    assert resumed["step"] == ref["step"] == k + 25
    for name, value in ref["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for name, value in ref_ema.items():
        assert torch.equal(resumed_ema[name], value), name
    assert not torch.equal(stopped["model"]["net.0.weight"], ref["model"]["net.0.weight"])  # it did train on
