"""The training data path: the window index stream (resume, ranks) and the streaming loader."""

import os
import signal
import time

import numpy as np
import pytest
import torch
from conftest import make_episode
from helpers import train_config
from omegaconf import open_dict

from protege.datasets.loader import WindowIndexStream, batch_iterator, decoded_nbytes, load_buffer, use_in_memory
from protege.datasets.replay_buffer import ReplayBuffer
from protege.datasets.sampler import SequenceSampler
from protege.errors import ConfigError
from protege.training.trainer import train


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_index_stream_is_a_function_of_the_position_and_ranks_are_disjoint():
    n, b = 50, 8
    single = np.concatenate(take(WindowIndexStream(n, 2 * b, seed=3), 12))
    ranks = [take(WindowIndexStream(n, b, seed=3, rank=r, world=2), 12) for r in range(2)]
    for step in range(12):
        a, c = ranks[0][step], ranks[1][step]
        assert not set(a) & set(c)  # disjoint windows within a step
        assert np.array_equal(np.concatenate([a, c]), single[step * 2 * b:(step + 1) * 2 * b])  # = union
    epoch = 48  # whole global batches per epoch: 3 x 16 of the 50 windows
    for e in range(3):  # distinct windows within an epoch, a fresh order each epoch
        assert len(set(single[e * epoch:(e + 1) * epoch])) == epoch
    assert len(set(single[:3 * epoch])) == n  # the 2 left out of one epoch come in another
    assert not np.array_equal(single[:epoch], single[epoch:2 * epoch])
    resumed = take(WindowIndexStream(n, 2 * b, seed=3, position=5 * 2 * b), 7)
    assert np.array_equal(np.concatenate(resumed), single[5 * 2 * b:])
    assert not np.array_equal(take(WindowIndexStream(n, b, seed=4), 1)[0], single[:b])


def test_memory_budget_decides(tmp_path, rng):
    buf = ReplayBuffer.create(tmp_path / "b.zarr", fps=10)
    for _ in range(2):
        buf.append_episode(make_episode(rng, 20, image=True))
    nbytes = decoded_nbytes(buf, ["obs/cam", "action"])
    assert nbytes == 40 * (8 * 8 * 3 + 3 * 4)
    assert use_in_memory("auto", nbytes, budget_gb=nbytes / 2**30) and not use_in_memory("auto", nbytes, 1e-9)
    assert use_in_memory(True, nbytes, 0) and not use_in_memory("false", 0, 1)
    with pytest.raises(ConfigError, match="train.data.in_memory"):
        use_in_memory("maybe", 0, 1)
    streamed, in_memory = load_buffer(tmp_path / "b.zarr", ["obs/cam", "action"], "auto", budget_gb=1e-9)
    assert not in_memory and isinstance(streamed.data["action"], np.ndarray)  # low-dim keys read once
    assert not isinstance(streamed.data["obs/cam"], np.ndarray)  # images stay in the store


def image_store(tmp_path, rng, url: str = "file") -> str:
    store = f"memory://loader-test-{rng.integers(1 << 30)}.zarr" if url == "memory" else f"file://{tmp_path}/b.zarr"
    buf = ReplayBuffer.create(store, fps=10)
    for length in (30, 7, 45):
        buf.append_episode(make_episode(rng, length, image=True))
    return store


# file: workers started by forkserver (the default) or fork; memory:// stores always fork
@pytest.mark.parametrize(("url", "start"), [("file", "forkserver"), ("file", "fork"), ("memory", "forkserver")])
def test_streaming_batches_equal_in_memory_batches_for_any_worker_count(tmp_path, rng, url, start):
    store = image_store(tmp_path, rng, url)
    keys = ["obs/state", "obs/cam", "action"]
    mem, _ = load_buffer(store, keys, in_memory=True)
    disk, in_memory = load_buffer(store, keys, in_memory=False)
    assert not in_memory
    expected = None
    for workers in (0, 2):
        batches = []
        for source, streaming in ((mem, False), (disk, True)):
            sampler = SequenceSampler(source, ["obs/state", "obs/cam"], n_obs_steps=2, horizon=8)
            stream = WindowIndexStream(len(sampler), 16, seed=0, position=32)
            it = batch_iterator(sampler, stream, streaming=streaming, num_workers=workers, prefetch_factor=2,
                                worker_start=start)
            batches.append([next(it) for _ in range(6)])
        expected = expected or batches[0]
        for got in batches:
            for a, b in zip(expected, got):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert expected[0]["obs/cam"].shape == (16, 2, 8, 8, 3)


def test_workers_ignore_stop_signals_and_the_start_method_is_checked(tmp_path, rng):
    """Ctrl-C / SIGTERM reach the whole process group; the training process handles them (finishes
    the step, checkpoints), so a forkserver-started worker must survive them and keep serving."""
    store = image_store(tmp_path, rng)
    disk, _ = load_buffer(store, ["obs/state", "obs/cam", "action"], in_memory=False)
    sampler = SequenceSampler(disk, ["obs/state", "obs/cam"], n_obs_steps=1, horizon=4)
    it = batch_iterator(sampler, WindowIndexStream(len(sampler), 4, seed=0), streaming=True, num_workers=1,
                        prefetch_factor=1)
    next(it)
    (worker,) = it._workers  # torch's worker processes (private; no public handle)
    assert worker._start_method == "forkserver"  # the default
    for s in (signal.SIGINT, signal.SIGTERM):
        os.kill(worker.pid, s)
    time.sleep(0.5)
    expected = [sampler.gather(WindowIndexStream(len(sampler), 4, seed=0).indices_at(4 * k)) for k in (1, 2, 3)]
    for want in expected:
        got = next(it)
        assert all(np.array_equal(got[k].numpy(), v) for k, v in want.items())
    assert worker.is_alive()
    del it
    with pytest.raises(ConfigError, match="train.data.worker_start"):
        batch_iterator(sampler, WindowIndexStream(len(sampler), 4, seed=0), streaming=True, num_workers=1,
                       worker_start="thread")


IMAGE_BC = ["task=pointmass_image", "policy=idm_bc", "policy.obs_encoder.freeze=false", "policy.obs_encoder.conv_channels=[8]",
            "policy.obs_encoder.hidden_dims=[32]", "policy.obs_encoder.out_dim=16", "policy.hidden_dims=[64]",
            "train.batch_size=16", "eval.n_episodes=0", "task.n_demos=4", "task.env.image_size=16", "train.ema.enabled=false"]


def test_streaming_training_resumes_exactly_whatever_the_worker_count(tmp_path):
    """Streamed from the store with 2 workers, interrupted, resumed with 1 worker: the same losses
    as an uninterrupted in-memory run (the batches are a function of the saved position alone)."""
    common = [*IMAGE_BC, "train.steps=10", f"task.dataset={tmp_path}/pm.zarr"]
    full = train(train_config(tmp_path / "mem", *common, "train.data.in_memory=true"), progress=False)["losses"]
    cfg = train_config(tmp_path / "stream", *common, "train.data.in_memory=auto", "train.data.memory_budget_gb=1e-6",
                       "train.data.num_workers=2", "train.stop_at=5")
    first = train(cfg, progress=False)["losses"]
    with open_dict(cfg):
        cfg.train.stop_at, cfg.resume, cfg.train.data.num_workers = None, True, 1
    rest = train(cfg, progress=False)["losses"]
    assert first + rest == full
    assert len(full) == 10 and len(set(full)) > 1
