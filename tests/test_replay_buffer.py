import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr
from conftest import make_episode

from protege.datasets.frames import ImageStorage, LazyFrames
from protege.datasets.replay_buffer import ReplayBuffer
from protege.errors import DataError


def test_round_trip_disk_and_memory(tmp_path, rng):
    path = tmp_path / "buf.zarr"
    buf = ReplayBuffer.create(path, fps=20, attrs={"units": {"action": "joint delta"}}, image_storage=ImageStorage.parse("raw"))
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


def test_chunks_low_dim_about_a_megabyte_images_one_frame(tmp_path, rng):
    buf = ReplayBuffer.create(tmp_path / "b.zarr", fps=10)
    buf.append_episode({"action": np.zeros((3, 4), np.float32), "obs/cam": np.zeros((3, 96, 96, 3), np.uint8)})
    assert buf.data["obs/cam"].chunks == (1, 96, 96, 3)  # a window decodes only its own frames
    assert 0.5e6 <= np.prod(buf.data["action"].chunks) * 4 <= 4e6


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


# ------------------------------------------------------------------------------ camera frames
def smooth_frames(n, h=24, w=32, seed=0):
    """Camera-like frames: smooth gradients that move over time, plus a little sensor noise."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    f = np.stack([np.stack([128 + 100 * np.sin((xx + 3 * t) / 9), 128 + 90 * np.cos(yy / 7 + t / 5),
                            np.full_like(xx, 40.0 + 10 * t)], -1) for t in range(n)])
    return np.clip(f + r.normal(0, 2, f.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("codec,max_mean_err", [("jpeg", 2.0), ("jpeg:50", 6.0), ("png", 0.0), ("raw", 0.0)])
def test_image_codecs_round_trip(tmp_path, codec, max_mean_err):
    path = tmp_path / "b.zarr"
    buf = ReplayBuffer.create(path, fps=10, image_storage=ImageStorage.parse(codec))
    eps = [smooth_frames(n, seed=n) for n in (7, 12)]
    for ep in eps:
        buf.append_episode({"action": np.zeros((len(ep), 2), np.float32), "obs/cam": ep})
    back = ReplayBuffer.open(path)
    got = np.concatenate([back.get_episode(i)["obs/cam"] for i in range(2)])
    want = np.concatenate(eps)
    err = np.abs(got.astype(int) - want)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert err.mean() <= max_mean_err, err.mean()
    if max_mean_err == 0:
        np.testing.assert_array_equal(got, want)
    else:
        assert err.mean() > 0  # really lossy: the codec is in use
    assert back.data["obs/cam"].chunks == (1, 24, 32, 3)
    name = codec.split(":")[0]
    assert f"obs/cam" in back.summary() and (f"{codec if ':' in codec else 'jpeg:95'}" if name == "jpeg" else name) in back.summary()
    np.testing.assert_array_equal(ReplayBuffer.load(path).data["obs/cam"], got)  # in-memory path decodes the same


def test_jpeg_keeps_channel_order_and_beats_raw_on_size(tmp_path):
    frames = np.zeros((4, 32, 48, 3), np.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 220, 120, 30  # distinct R, G, B
    frames[:, 8:24, 8:40] = (20, 60, 200)
    buf = ReplayBuffer.create(tmp_path / "flat.zarr", fps=10)
    buf.append_episode({"action": np.zeros((4, 2), np.float32), "obs/cam": frames})
    got = ReplayBuffer.open(tmp_path / "flat.zarr").read("obs/cam", 2)
    # a red/blue swap would be off by ~190
    assert np.abs(got[2, 2].astype(int) - (220, 120, 30)).max() <= 6 and np.abs(got[16, 24].astype(int) - (20, 60, 200)).max() <= 6
    sizes = {}
    for codec in ("jpeg", "raw"):  # on camera-like frames (noise defeats lossless compression)
        buf = ReplayBuffer.create(tmp_path / f"{codec}.zarr", fps=10, image_storage=ImageStorage.parse(codec))
        buf.append_episode({"action": np.zeros((4, 2), np.float32), "obs/cam": smooth_frames(4, 96, 128)})
        sizes[codec] = sum(f.stat().st_size for f in (tmp_path / f"{codec}.zarr" / "data" / "obs" / "cam").rglob("*") if f.is_file())
    assert sizes["jpeg"] * 2 < sizes["raw"], sizes


def test_read_api_matches_episode_reads(tmp_path, rng):
    buf = ReplayBuffer.create(tmp_path / "b.zarr", fps=10)
    for n in (5, 9, 3):
        ep = make_episode(rng, n)
        ep["obs/cam"] = smooth_frames(n, seed=n)
        buf.append_episode(ep)
    for b in (ReplayBuffer.open(tmp_path / "b.zarr"), ReplayBuffer.load(tmp_path / "b.zarr")):
        full = {k: np.concatenate([b.get_episode(i)[k] for i in range(3)]) for k in b.keys()}
        idx = np.array([[16, 0, 0], [5, 6, 4]])  # any order, repeats, across episodes
        for k in b.keys():
            np.testing.assert_array_equal(b.read(k, idx), full[k][idx])
            np.testing.assert_array_equal(b.read(k, slice(3, 11)), full[k][3:11])
            np.testing.assert_array_equal(b.read(k, slice(None, None, 4)), full[k][::4])
            np.testing.assert_array_equal(b.read(k, [2, 1]), full[k][[2, 1]])
            np.testing.assert_array_equal(b.read(k, 7), full[k][7])
            assert b.read(k, []).shape == (0, *full[k].shape[1:])
        steps = b.read_steps(np.arange(4, 8), keys=["action", "obs/cam"])
        assert set(steps) == {"action", "obs/cam"} and steps["obs/cam"].shape == (4, 24, 32, 3)
        with pytest.raises(IndexError, match="step 17 out of range"):
            b.read("obs/cam", [3, 17])


def test_resize_on_write(tmp_path):
    import cv2

    frames = smooth_frames(6, 48, 64)
    buf = ReplayBuffer.create(tmp_path / "b.zarr", fps=10, image_storage=ImageStorage.parse("png", "24x32"))
    buf.append_episode({"action": np.zeros((6, 2), np.float32), "obs/cam": frames})
    got = ReplayBuffer.open(tmp_path / "b.zarr").read("obs/cam", slice(None))
    want = np.stack([cv2.resize(f, (32, 24), interpolation=cv2.INTER_AREA) for f in frames])
    np.testing.assert_array_equal(got, want)
    assert ReplayBuffer.open(tmp_path / "b.zarr").image_storage.resize == (24, 32)
    with pytest.raises(DataError, match=r"image storage png, resize 24x32.*storing frames as png, resize 24x32|storing frames as"):
        ReplayBuffer.open_or_create(tmp_path / "b.zarr", fps=10, image_storage=ImageStorage.parse("jpeg"))


def _old_layout_buffer(path, episodes):
    """A buffer as written before per-frame codecs: raw frames, Blosc/zstd, ~1 MB chunks, no image_storage attr."""
    root = zarr.open_group(path, mode="w")
    root.attrs.update({"protege_format": 1, "fps": 10.0, "kinds": {"action": "action", "obs/cam": "image"},
                       "units": {}, "provenance": {}})
    data = root.require_group("data")
    codec = zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
    cat = {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]}
    data.create_array("action", data=cat["action"], chunks=(1000, 2), compressors=codec)
    data.require_group("obs").create_array("cam", data=cat["obs/cam"], chunks=(341, 24, 32, 3), compressors=codec)
    ends = np.cumsum([len(e["action"]) for e in episodes]).astype(np.int64)
    root.require_group("meta").create_array("episode_ends", data=ends, chunks=(1 << 16,))
    return cat


def test_old_raw_buffers_open_read_and_append_identically(tmp_path):
    eps = [{"action": np.full((n, 2), n, np.float32), "obs/cam": smooth_frames(n, seed=n)} for n in (4, 9)]
    cat = _old_layout_buffer(tmp_path / "old.zarr", eps)
    old = ReplayBuffer.open(tmp_path / "old.zarr", mode="a")
    np.testing.assert_array_equal(old.read("obs/cam", slice(None)), cat["obs/cam"])
    np.testing.assert_array_equal(old.read("obs/cam", [12, 0, 5]), cat["obs/cam"][[12, 0, 5]])
    np.testing.assert_array_equal(old.get_episode(1)["obs/cam"], eps[1]["obs/cam"])
    assert "raw+blosc" in old.summary()
    extra = smooth_frames(3, seed=99)
    old.append_episode({"action": np.zeros((3, 2), np.float32), "obs/cam": extra})  # keeps its raw array
    np.testing.assert_array_equal(ReplayBuffer.open(tmp_path / "old.zarr").get_episode(2)["obs/cam"], extra)


class _Source(LazyFrames):
    """Frames produced on demand; records the largest read and can fail at one frame."""

    def __init__(self, frames, fail_at=None):
        super().__init__(frames.shape)
        self.frames, self.fail_at, self.max_read = frames, fail_at, 0

    def __getitem__(self, sl):
        start, stop, _ = sl.indices(len(self))
        self.max_read = max(self.max_read, stop - start)
        if self.fail_at is not None and start <= self.fail_at < stop:
            raise DataError("src.hdf5", "cam", "a decodable frame", f"garbage at frame {self.fail_at}")
        return self.frames[sl]


def test_lazy_frames_stream_in_small_blocks_and_a_failure_commits_nothing(tmp_path):
    frames = smooth_frames(70, seed=3)
    buf = ReplayBuffer.create(tmp_path / "b.zarr", fps=10, image_storage=ImageStorage.parse("png"))
    src = _Source(frames)
    buf.append_episode({"action": np.zeros((70, 2), np.float32), "obs/cam": src})
    assert src.max_read <= 16  # memory bounded by a few frames, not the episode
    with pytest.raises(DataError, match="garbage at frame 40"):
        buf.append_episode({"action": np.zeros((70, 2), np.float32), "obs/cam": _Source(frames, fail_at=40)})
    assert ReplayBuffer.open(tmp_path / "b.zarr").n_episodes == 1  # nothing of the bad episode
    buf.append_episode({"action": np.ones((5, 2), np.float32), "obs/cam": frames[:5]})
    back = ReplayBuffer.open(tmp_path / "b.zarr")
    assert back.n_episodes == 2 and back.data["obs/cam"].shape[0] == 75
    np.testing.assert_array_equal(back.get_episode(1)["obs/cam"], frames[:5])
    np.testing.assert_array_equal(back.get_episode(0)["obs/cam"], frames)


def test_corrupt_frame_in_store_names_key_and_step(tmp_path):
    buf = ReplayBuffer.create(tmp_path / "b.zarr", fps=10)
    buf.append_episode({"action": np.zeros((4, 2), np.float32), "obs/cam": smooth_frames(4)})
    chunk = tmp_path / "b.zarr" / "data" / "obs" / "cam" / "c" / "2" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    with pytest.raises(DataError, match=r"obs/cam step 2.*expected a decodable jpeg frame"):
        ReplayBuffer.open(tmp_path / "b.zarr").read("obs/cam", [1, 2])


def test_bad_image_options_are_one_line_errors():
    from protege.errors import ConfigError

    for codec in ("webp", "png:5", "jpeg:0", "jpeg:101"):
        with pytest.raises(ConfigError, match="--image-codec"):
            ImageStorage.parse(codec)
    for size in ("240", "0x5", "ax3"):
        with pytest.raises(ConfigError, match="--resize"):
            ImageStorage.parse(None, size)
    assert ImageStorage.parse("JPG:80", "240x320") == ImageStorage("jpeg", 80, (240, 320))


def test_collect_cli_stores_frames_with_the_chosen_codec(tmp_path, capsys):
    from protege.cli import main

    out = tmp_path / "pm.zarr"
    args = ["collect", "task=pointmass_image", "n_episodes=1", f"out={out}", "--image-codec", "png", "--resize=16x16"]
    assert main(args) == 0
    buf = ReplayBuffer.open(out)
    cams = [k for k, v in buf.kinds.items() if v == "image"]
    assert cams and all(buf.data[k].shape[1:3] == (16, 16) for k in cams)
    assert "png, 1 frame/chunk" in capsys.readouterr().out
    assert main(["collect", "task=pointmass_image", "n_episodes=2", f"out={out}", "image_codec=jpeg"]) == 2  # mismatch
    assert "storing frames as png" in capsys.readouterr().err
