"""Multi-process training on CPU (gloo): gradient synchronisation and multi-node launches.

Every process is started through torchrun, the way users launch it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_config

from protege.envs.collect import collect
from protege.training import checkpoint as ckpt
from protege.training.trainer import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
BC = ["task=pointmass", "policy=bc", "policy.hidden_dims=[32,32]", "eval.n_episodes=0", "device=cpu",
      "train.log_every=1000", "train.val_every=0"]
# one training run per rank; each saves its online weights so the test can compare ranks
RANK_SCRIPT = """
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import train_config
from protege.training.trainer import train
result = train(train_config(Path({tmp!r}), *sys.argv[1:]), progress=False)
torch.save(result["policy"].state_dict(), os.path.join({tmp!r}, f"rank{{os.environ['RANK']}}.pt"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pointmass(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pm.zarr"
    collect("pointmass", {"max_episode_steps": 80}, 6, path, fps=10, seed=0, progress=False)
    return path


def test_ddp_step_equals_one_process_step_on_the_union_of_the_rank_batches(tmp_path, pointmass):
    """Two ranks draw disjoint windows; after two DDP steps both hold identical weights, equal to
    one process taking the same steps on both ranks' windows at once. Without the gradient
    all-reduce the ranks would drift apart; with both ranks on the same windows the single-process
    run (which sees 2x as many distinct windows) would differ."""
    overrides = [*BC, f"dataset={pointmass}", "train.steps=2", "train.warmup_steps=0", "train.ema.enabled=false",
                 "train.lr=1e-2", "train.amp=none"]
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(script), *overrides, "train.batch_size=8"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = train(train_config(tmp_path / "single", *overrides, "train.batch_size=16"), progress=False)["policy"]
    init = train(train_config(tmp_path / "init", *overrides, "train.batch_size=16", "train.steps=0"), progress=False)["policy"]
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], value, atol=1e-6, rtol=1e-5), name
    assert not torch.equal(init.net[0].weight, single.net[0].weight)  # the steps did move the weights


def torchrun_nodes(args: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Two single-process 'nodes' meeting through c10d rendezvous on 127.0.0.1."""
    rdzv = [f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_backend=c10d", "--rdzv_id=protege-test"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", *rdzv,
           "-m", "protege.cli", "train", *args]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    for o in out:
        assert o.returncode == 0, o.stderr[-3000:]
    return out


@pytest.mark.slow  # four torchrun launches + processes: ~40 s on an idle 2-core CPU
def test_two_node_torchrun_trains_to_a_checkpoint_and_resumes(tmp_path, pointmass):
    run = tmp_path / "run"
    args = [*BC, f"dataset={pointmass}", f"run_dir={run}", "train.steps=12", "train.batch_size=16"]
    torchrun_nodes([*args, "train.stop_at=6"])
    state = torch.load(ckpt.resolve_checkpoint(run) / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["windows"] == 6 * 16 * 2 and len(state["rng"]["torch_ranks"]) == 2
    out = torchrun_nodes([*args, "resume=true"])
    assert any("at step 6" in o.stdout for o in out), [o.stdout for o in out]
    state = torch.load(ckpt.resolve_checkpoint(run) / "train_state.pt", weights_only=True)
    assert state["step"] == 12 and state["windows"] == 12 * 16 * 2
