import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr
from conftest import make_episode

from protege.datasets.replay_buffer import ReplayBuffer
from protege.errors import DataError


def test_round_trip_disk_and_memory(tmp_path, rng):
    path = tmp_path / "buf.zarr"
    buf = ReplayBuffer.create(path, fps=20, attrs={"units": {"action": "joint delta"}})
    eps = [make_episode(rng, n, image=True) for n in (5, 1, 17, 9)]
    for ep in eps:
        buf.append_episode(ep)
    reopened = ReplayBuffer.open(path)
    mem = ReplayBuffer.load(path)
    for b in (buf, reopened, mem):
        assert b.n_episodes == 4 and len(b) == 32 and b.fps == 20
        assert list(b.episode_ends) == [5, 6, 23, 32]
        assert b.kinds == {"obs/state": "state", "action": "action", "obs/cam": "image"}
        for i, ep in enumerate(eps):
            got = b.get_episode(i)
            for k in ep:
                np.testing.assert_array_equal(got[k], ep[k])
                assert got[k].dtype == ep[k].dtype
    assert reopened.attrs["units"] == {"action": "joint delta"}
    assert isinstance(mem.data["action"], np.ndarray)
    # appending to a reopened buffer continues it
    more = ReplayBuffer.open(path, mode="a")
    more.append_episode(make_episode(rng, 3, image=True))
    assert ReplayBuffer.open(path).n_episodes == 5
    assert "episodes: 5" in ReplayBuffer.open(path).summary()


def test_memory_store_and_load_subset(rng):
    store = zarr.storage.MemoryStore()
    buf = ReplayBuffer.create(store, fps=10)
    buf.append_episode(make_episode(rng, 4))
    mem = ReplayBuffer.load(ReplayBuffer.open(store), keys=["action"])
    assert mem.keys() == ["action"] and len(mem) == 4


def test_chunks_along_time_are_about_a_megabyte(tmp_path, rng):
    buf = ReplayBuffer.create(tmp_path / "b.zarr", fps=10)
    buf.append_episode({"action": np.zeros((3, 4), np.float32), "obs/cam": np.zeros((3, 96, 96, 3), np.uint8)})
    img_chunk = buf.data["obs/cam"].chunks
    assert img_chunk[1:] == (96, 96, 3)
    assert 0.5e6 <= np.prod(img_chunk) <= 4e6


BAD_EPISODES = {
    "missing key": (lambda ep: {k: v for k, v in ep.items() if k != "obs/state"}, "obs/state", "key missing"),
    "misspelled key": (lambda ep: {("obs/stat" if k == "obs/state" else k): v for k, v in ep.items()}, "obs/stat", "did you mean 'obs/state'"),
    "ragged lengths": (lambda ep: {**ep, "obs/state": ep["obs/state"][:-1]}, "obs/state", "steps"),
    "nan action": (lambda ep: {**ep, "action": np.where(np.arange(3) == 1, np.nan, ep["action"]).astype(np.float32)}, "action", "finite"),
    "inf obs": (lambda ep: {**ep, "obs/state": np.full_like(ep["obs/state"], np.inf)}, "obs/state", "finite"),
    "wrong dtype (strings)": (lambda ep: {**ep, "action": ep["action"].astype(str)}, "action", "numeric"),
    "wrong dtype (float image)": (lambda ep: {**ep, "obs/cam": ep["obs/cam"].astype(np.float32)}, "obs/cam", "dtype"),
    "wrong shape": (lambda ep: {**ep, "action": np.zeros((len(ep["action"]), 7), np.float32)}, "action", "per-step shape"),
    "empty episode": (lambda ep: {k: v[:0] for k, v in ep.items()}, "action", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_EPISODES))
def test_bad_episodes_raise_clear_error_and_write_nothing(tmp_path, rng, case):
    path = tmp_path / "buf.zarr"
    buf = ReplayBuffer.create(path, fps=10)
    good = make_episode(rng, 6, image=True)
    buf.append_episode(good)
    mutate, key, found = BAD_EPISODES[case]
    with pytest.raises(DataError) as err:
        buf.append_episode(mutate(make_episode(rng, 6, image=True)))
    msg = str(err.value)
    assert str(path) in msg and key in msg and "expected" in msg and found in msg, msg
    after = ReplayBuffer.open(path)
    assert after.n_episodes == 1 and all(after.data[k].shape[0] == 6 for k in after.keys())


def test_first_episode_needs_action(tmp_path, rng):
    buf = ReplayBuffer.create(tmp_path / "b.zarr", fps=10)
    with pytest.raises(DataError, match="action"):
        buf.append_episode({"obs/state": np.zeros((3, 2), np.float32)})


@pytest.mark.parametrize("kind", ["missing dir", "plain dir", "zarr group without attrs", "ends beyond data"])
def test_opening_something_that_is_not_a_buffer(tmp_path, rng, kind):
    path = tmp_path / "x.zarr"
    if kind == "plain dir":
        path.mkdir()
        (path / "notes.txt").write_text("hi")
    elif kind == "zarr group without attrs":
        zarr.open_group(path, mode="w").create_array("a", shape=(3,), dtype="f4")
    elif kind == "ends beyond data":
        buf = ReplayBuffer.create(path, fps=10)
        buf.append_episode(make_episode(rng, 5))
        buf.append_episode(make_episode(rng, 5))
        buf.data["action"].resize((7, 3))  # simulate a truncated/corrupted data array
    with pytest.raises(DataError) as err:
        ReplayBuffer.open(path)
    assert str(path) in str(err.value) and "expected" in str(err.value)


def test_unknown_key_lookup_names_the_key(tmp_path, rng):
    buf = ReplayBuffer.create(tmp_path / "b.zarr", fps=10)
    buf.append_episode(make_episode(rng, 3))
    with pytest.raises(DataError, match="did you mean 'obs/state'"):
        buf["obs/stat"]


def test_refuses_to_overwrite(tmp_path, rng):
    ReplayBuffer.create(tmp_path / "b.zarr", fps=10).append_episode(make_episode(rng, 3))
    with pytest.raises(DataError, match="existing data"):
        ReplayBuffer.create(tmp_path / "b.zarr", fps=10)


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from protege.datasets.replay_buffer import ReplayBuffer
    path = sys.argv[1]
    buf = ReplayBuffer.open_or_create(path, fps=10)
    i = buf.n_episodes
    while True:
        n = 20 + i % 13
        buf.append_episode({"action": np.full((n, 2), i, np.float32),
                            "obs/cam": np.full((n, 48, 48, 3), i % 251, np.uint8)})
        print(i, flush=True)
        i += 1
    """
)


def _check_episodes(path):
    buf = ReplayBuffer.open(path)
    for i in range(buf.n_episodes):
        ep = buf.get_episode(i)
        assert len(ep["action"]) == 20 + i % 13
        assert (ep["action"] == i).all() and (ep["obs/cam"] == i % 251).all()
    return buf.n_episodes


def test_sigkill_mid_append_leaves_only_complete_episodes(tmp_path):
    path = tmp_path / "killed.zarr"
    counts = []
    for delay in (0.0, 0.013, 0.031, 0.057):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        printed = []
        while len(printed) < 3:
            printed.append(int(proc.stdout.readline()))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        printed += [int(x) for x in proc.stdout.read().split()]
        n = _check_episodes(path)
        # every episode reported as committed is there; at most the one in flight may also be
        assert printed[-1] + 1 <= n <= printed[-1] + 2
        counts.append(n)
    assert counts == sorted(counts) and len(set(counts)) == len(counts)  # each rerun resumed and added
