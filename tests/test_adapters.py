"""Dataset adapters: fixtures written here following each format's published layout."""

import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from helpers import train_config

from protege.cli import main
from protege.datasets.adapters import convert
from protege.datasets.adapters.robomimic import export
from protege.datasets.frames import ImageStorage
from protege.datasets.replay_buffer import ReplayBuffer
from protege.errors import DataError
from protege.training.trainer import train


RAW = ImageStorage.parse("raw")  # exact frames, for tests that compare values


def make_robomimic(path, lengths=(5, 7, 4), image=(8, 8), names=None, seed=0, mutate=None):
    rng = np.random.default_rng(seed)
    names = names or [f"demo_{i}" for i in range(len(lengths))]
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}})
        data.attrs["total"] = int(sum(lengths))
        for name, n in zip(names, lengths):
            g = data.create_group(name)
            g.attrs["num_samples"] = n
            # smooth, learnable demos: the action is a function of the current end-effector state
            phase = rng.uniform(0, 2 * np.pi) + 0.2 * np.arange(n)
            g["obs/robot0_eef_pos"] = np.stack([np.sin(phase), np.cos(phase), 0.01 * np.arange(n)], axis=1)
            g["actions"] = np.concatenate([np.stack([np.cos(phase), -np.sin(phase)], axis=1), np.zeros((n, 5))], axis=1)
            if image:
                g["obs/agentview_image"] = rng.integers(0, 255, (n, *image, 3), dtype=np.uint8)
            g["rewards"] = rng.random(n)
            g["dones"] = (np.arange(n) == n - 1).astype(np.int64)
            g["states"] = rng.standard_normal((n, 10))
        f["mask/train"] = np.array([names[0].encode(), names[-1].encode()])
        f["mask/valid"] = np.array([names[1].encode()])
        if mutate:
            mutate(f)
    return path


def make_aloha(folder, n=2, T=6, cams=("top",), size=(12, 16), sim=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with h5py.File(folder / f"episode_{i}.hdf5", "w") as f:
            f.attrs["sim"] = sim
            f["observations/qpos"] = rng.standard_normal((T, 14))
            f["observations/qvel"] = rng.standard_normal((T, 14))
            for c in cams:
                f[f"observations/images/{c}"] = rng.integers(0, 255, (T, *size, 3), dtype=np.uint8)
            f["action"] = rng.standard_normal((T, 14))
    return folder


def make_npz(folder, n=3, T=5, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.savez(folder / f"ep{i}.npz", observations=rng.standard_normal((T + i, 4)).astype(np.float32),
                 actions=rng.standard_normal((T + i, 2)).astype(np.float32))
    return folder


def test_robomimic_import_keeps_order_values_and_metadata(tmp_path):
    src = make_robomimic(tmp_path / "lift.hdf5", lengths=(5, 7, 4), names=["demo_2", "demo_10", "demo_1"])
    buf = convert(src, tmp_path / "out.zarr", progress=False, image_storage=RAW)
    with h5py.File(src) as f:
        for i, demo in enumerate(["demo_1", "demo_2", "demo_10"]):  # robomimic's numeric demo order
            ep = buf.get_episode(i)
            np.testing.assert_array_equal(ep["action"], f[f"data/{demo}/actions"][()])
            np.testing.assert_array_equal(ep["obs/agentview_image"], f[f"data/{demo}/obs/agentview_image"][()])
            np.testing.assert_array_equal(ep["sim_state"], f[f"data/{demo}/states"][()])
    meta = ReplayBuffer.open(tmp_path / "out.zarr").attrs
    assert meta["fps"] == 20 and meta["robomimic"]["env_args"]["env_name"] == "Lift"
    assert meta["robomimic"]["mask"] == {"train": [1, 0], "valid": [2]}  # [demo_2, demo_1], [demo_10] -> indices
    assert buf.kinds["obs/agentview_image"] == "image" and buf.kinds["reward"] == "state"


def test_aloha_import(tmp_path):
    src = make_aloha(tmp_path / "aloha", n=3, cams=("top", "left_wrist"))
    buf = convert(src, tmp_path / "out.zarr", progress=False, image_storage=RAW)
    assert buf.n_episodes == 3 and buf.fps == 50
    assert set(buf.keys()) == {"obs/state", "obs/qvel", "obs/top", "obs/left_wrist", "action"}
    with h5py.File(src / "episode_2.hdf5") as f:
        np.testing.assert_array_equal(buf.get_episode(2)["obs/top"], f["observations/images/top"][()])
    assert buf.attrs["provenance"]["sim"] is True and len(buf.attrs["units"]["joint_names"]) == 14


def rgb_frames(T, size=(24, 32), seed=0):
    """Smooth frames whose R, G and B differ clearly (a red/blue swap is visible)."""
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    return np.stack([np.stack([np.full_like(xx, 210), 60 + 3 * xx + t, 30 + 2 * yy + seed], -1)
                     for t in range(T)]).astype(np.uint8)


# act-plus-plus constants.py camera order: the rows of /compress_len (not alphabetical)
REAL_CAMS = ("cam_high", "cam_low", "cam_left_wrist")


def make_aloha_compressed(folder, n=2, T=8, cams=REAL_CAMS, size=(24, 32), depth=True, mutate=None):
    """Episodes as act-plus-plus's record_episodes.py writes them with COMPRESS=True."""
    import cv2

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        frames = {c: rgb_frames(T, size, seed=10 * k + i) for k, c in enumerate(cams)}
        # the recorder's quality 50; per-camera smoothing makes the streams' lengths differ
        encoded = {c: [cv2.imencode(".jpg", cv2.GaussianBlur(f, (3, 3), k + 1) if k else f, [cv2.IMWRITE_JPEG_QUALITY, 50])[1]
                       for f in frames[c]] for k, c in enumerate(cams)}
        if mutate:
            mutate(i, encoded)
        lens = np.array([[len(e) for e in encoded[c]] for c in cams])
        pad = lens.max()
        with h5py.File(folder / f"episode_{i}.hdf5", "w") as f:
            f.attrs["sim"] = False
            f.attrs["compress"] = True
            f["observations/qpos"] = rng.standard_normal((T, 14))
            f["observations/qvel"] = rng.standard_normal((T, 14))
            f["observations/effort"] = rng.standard_normal((T, 14))
            for c in cams:
                rows = np.zeros((T, pad), np.uint8)
                for t, e in enumerate(encoded[c]):
                    rows[t, : len(e)] = e.ravel()[:pad]
                f.create_dataset(f"observations/images/{c}", data=rows, chunks=(1, pad))
            if depth:
                f["observations/images/cam_high_depth"] = rng.integers(0, 4000, (T, *size), dtype=np.uint16)
            f["action"] = rng.standard_normal((T, 14))
            f["base_action"] = rng.standard_normal((T, 2))
            f.create_dataset("compress_len", data=lens.astype(np.float32))  # float32, as the recorder's default dtype
    return folder


def test_aloha_compressed_import_exact(tmp_path, monkeypatch):
    import cv2

    from protege.datasets.adapters import aloha

    reads = []
    original = aloha.JpegRows.__getitem__
    monkeypatch.setattr(aloha.JpegRows, "__getitem__", lambda self, sl: reads.append(sl.indices(len(self))) or original(self, sl))
    src = make_aloha_compressed(tmp_path / "real", n=2, T=40)
    buf = convert(src, tmp_path / "out.zarr", progress=False, image_storage=RAW)
    assert set(buf.keys()) == {"obs/state", "obs/qvel", "obs/effort", "action", "base_action", "obs/cam_high",
                               "obs/cam_low", "obs/cam_left_wrist", "obs/cam_high_depth"}
    assert buf.kinds["obs/cam_high"] == "image" and buf.kinds["obs/cam_high_depth"] == "state"
    assert buf.kinds["base_action"] == "action"
    with h5py.File(src / "episode_1.hdf5") as f:
        ep = buf.get_episode(1)
        for r, c in enumerate(REAL_CAMS):
            lens = f["compress_len"][r].astype(int)
            want = np.stack([cv2.imdecode(row[:n], cv2.IMREAD_COLOR) for row, n in zip(f[f"observations/images/{c}"][()], lens)])
            np.testing.assert_array_equal(ep[f"obs/{c}"], want, err_msg=c)  # decoded exactly as act-plus-plus does
        # channel order as recorded: R stays ~210, B stays low (a swap would put 210 in channel 2)
        assert abs(int(ep["obs/cam_high"][5, 3, 3, 0]) - 210) <= 8 and ep["obs/cam_high"][5, 3, 3, 2] < 120
        np.testing.assert_array_equal(ep["obs/cam_high_depth"], f["observations/images/cam_high_depth"][()])  # depth raw
        assert ep["obs/cam_high_depth"].dtype == np.uint16
        np.testing.assert_array_equal(ep["obs/effort"], f["observations/effort"][()])
        np.testing.assert_array_equal(ep["base_action"], f["base_action"][()])
    assert reads and max(stop - start for start, stop, _ in reads) <= 16  # streamed a few frames at a time


def _cut(t, cam="cam_high", keep=0.6):
    def mutate(i, enc):
        if i == 1:
            enc[cam][t] = enc[cam][t][: int(len(enc[cam][t]) * keep)]  # the stream was cut; compress_len agrees
    return mutate


def _resized(t, cam="cam_low"):
    def mutate(i, enc):
        import cv2

        if i == 1:
            enc[cam][t] = cv2.imencode(".jpg", rgb_frames(1, (20, 32))[0])[1]
    return mutate


BAD_FRAMES = {
    "truncated jpeg": (_cut(3), r"observations/images/cam_high frame 3\]: expected a complete JPEG stream.*truncated JPEG"),
    "frame of another size": (_resized(2), r"observations/images/cam_low frame 2\]: expected a frame of shape \(24, 32, 3\).*\(20, 32, 3\)"),
    "garbage bytes": (lambda i, enc: i == 1 and enc["cam_left_wrist"].__setitem__(4, np.full((300, 1), 7, np.uint8)),
                      r"observations/images/cam_left_wrist frame 4\]: expected a JPEG stream"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_compressed_frames_name_file_camera_frame(tmp_path, case):
    mutate, pattern = BAD_FRAMES[case]
    src = make_aloha_compressed(tmp_path / "real", n=3, T=8, depth=False, mutate=mutate)
    with pytest.raises(DataError, match=r"episode_1\.hdf5 \[" + pattern):
        convert(src, tmp_path / "o.zarr", progress=False)
    out = ReplayBuffer.open(tmp_path / "o.zarr")
    assert out.n_episodes == 1 and out.read("obs/cam_high", slice(None)).shape[0] == 8  # episode 0 only, nothing of 1


def test_compress_len_longer_than_the_row(tmp_path):
    src = make_aloha_compressed(tmp_path / "real", n=1, T=6, depth=False)
    with h5py.File(src / "episode_0.hdf5", "a") as f:
        row_len = f["observations/images/cam_low"].shape[1]
        f["compress_len"][1, 4] = row_len + 10  # row 1 = cam_low (the recorder's order)
    with pytest.raises(DataError, match=rf"episode_0\.hdf5 \[observations/images/cam_low frame 4\]: expected compress_len at most the row length {row_len}"):
        convert(src, tmp_path / "o.zarr", progress=False)
    assert ReplayBuffer.open(tmp_path / "o.zarr").n_episodes == 0


def test_compressed_import_default_codec_stays_close(tmp_path):
    src = make_aloha_compressed(tmp_path / "real", n=1, T=6, depth=False)
    exact = convert(src, tmp_path / "raw.zarr", progress=False, image_storage=RAW).get_episode(0)["obs/cam_high"]
    stored = convert(src, tmp_path / "jpeg.zarr", progress=False)  # default: JPEG quality 95
    got = stored.get_episode(0)["obs/cam_high"]
    assert "jpeg:95" in stored.summary() and np.abs(got.astype(int) - exact).mean() < 2.0


def test_npz_import_with_key_map_and_natural_order(tmp_path):
    src = make_npz(tmp_path / "npz", n=12)
    buf = convert(src, tmp_path / "out.zarr", key_map={"obs/state": "observations", "action": "actions"}, progress=False)
    assert buf.n_episodes == 12 and list(buf.episode_lengths[:3]) == [5, 6, 7]
    assert buf.episode_lengths[10] == 15  # ep10 after ep9, not after ep1


def test_round_trip_ours_robomimic_ours(tmp_path):
    first = convert(make_robomimic(tmp_path / "a.hdf5"), tmp_path / "a.zarr", progress=False, image_storage=RAW)
    export(first, tmp_path / "b.hdf5", progress=False)
    second = convert(tmp_path / "b.hdf5", tmp_path / "b.zarr", progress=False, image_storage=RAW)
    assert second.n_episodes == first.n_episodes and set(second.keys()) == set(first.keys())
    for i in range(first.n_episodes):
        a, b = first.get_episode(i), second.get_episode(i)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            assert a[k].dtype == b[k].dtype
    assert second.attrs["robomimic"]["mask"] == first.attrs["robomimic"]["mask"]
    assert second.attrs["robomimic"]["env_args"] == first.attrs["robomimic"]["env_args"]
    with h5py.File(tmp_path / "b.hdf5") as f:  # robomimic's own conventions
        assert f["data"].attrs["total"] == first.n_steps
        np.testing.assert_array_equal(f["data/demo_0/next_obs/robot0_eef_pos"][:-1], f["data/demo_0/obs/robot0_eef_pos"][1:])


def test_a_policy_trains_from_a_converted_buffer(tmp_path):
    buf = convert(make_robomimic(tmp_path / "r.hdf5", lengths=(30, 25, 40), image=None), tmp_path / "r.zarr", progress=False)
    cfg = train_config(tmp_path, "task=pointmass", "policy=bc", f"dataset={buf.path}", "task.obs_keys=[obs/robot0_eef_pos]",
                       "train.steps=200", "train.batch_size=64", "eval.n_episodes=0")
    losses = train(cfg, progress=False)["losses"]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])


# ------------------------------------------------------------------ malformed inputs
def _rm(key):
    return lambda f: f.__delitem__(key)


def _empty_demo(g):
    for key in list(g):
        del g[key]
    g["actions"] = np.zeros((0, 7))
    g["obs/robot0_eef_pos"] = np.zeros((0, 3))


def _replace(key, value):
    def mutate(f):
        del f[key]
        f[key] = value
    return mutate


BAD_ROBOMIMIC = {
    "missing data group": (_rm("data"), "data", "demo_<N>"),
    "missing actions": (_rm("data/demo_1/actions"), "data/demo_1/actions", "missing"),
    "missing obs group": (_rm("data/demo_1/obs"), "data/demo_1/obs", "missing"),
    "actions of strings": (_replace("data/demo_1/actions", np.array([[b"x"] * 7] * 7)), "data/demo_1/actions", "numeric"),
    "obs shorter than actions": (_replace("data/demo_1/obs/robot0_eef_pos", np.zeros((6, 3))), "data/demo_1/obs/robot0_eef_pos", "6 steps"),
    "NaN action": (_replace("data/demo_1/actions", np.full((7, 7), np.nan)), "data/demo_1/actions", "finite"),
    "empty episode": (lambda f: _empty_demo(f["data/demo_1"]), "data/demo_1/actions", "0 steps"),
    "float images": (_replace("data/demo_1/obs/agentview_image", np.zeros((7, 8, 8, 3), np.float32)), "data/demo_1/obs/agentview_image", "uint8"),
    "images of another size": (_replace("data/demo_1/obs/agentview_image", np.zeros((7, 9, 8, 3), np.uint8)), "data/demo_1/obs/agentview_image", "(9, 8, 3)"),
    "mask names a missing demo": (_replace("mask/valid", np.array([b"demo_9"])), "mask/valid", "demo_9"),
    "env_args not JSON": (lambda f: f["data"].attrs.__setitem__("env_args", "{nope"), "env_args", "invalid JSON"),
    "unexpected group name": (lambda f: f["data"].create_group("trajectory_1"), "data/trajectory_1", "demo_<N>"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROBOMIMIC))
def test_malformed_robomimic(tmp_path, case):
    mutate, key, found = BAD_ROBOMIMIC[case]
    src = make_robomimic(tmp_path / "bad.hdf5", lengths=(5, 7, 4), mutate=mutate)
    out = tmp_path / "out.zarr"
    with pytest.raises(DataError) as err:
        convert(src, out, fmt="robomimic", progress=False)
    msg = str(err.value)
    assert "bad.hdf5" in msg and key in msg and "expected" in msg and found in msg, msg
    if out.exists():  # only complete, valid episodes were committed (demo_0 before the bad demo_1)
        assert ReplayBuffer.open(out).n_episodes <= 1


def test_truncated_hdf5(tmp_path):
    src = make_robomimic(tmp_path / "t.hdf5")
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    with pytest.raises(DataError, match=r"t\.hdf5.*readable HDF5"):
        convert(src, tmp_path / "out.zarr", fmt="robomimic", progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_malformed_aloha(tmp_path):
    src = make_aloha(tmp_path / "a", n=3)
    with h5py.File(src / "episode_1.hdf5", "a") as f:
        del f["observations/qpos"]
    with pytest.raises(DataError, match=r"episode_1\.hdf5 \[observations/qpos\]: expected an HDF5 dataset, found missing"):
        convert(src, tmp_path / "o1.zarr", progress=False)
    assert ReplayBuffer.open(tmp_path / "o1.zarr").n_episodes == 1

    src = make_aloha(tmp_path / "b", n=2)
    make_aloha(tmp_path / "b2", n=1, size=(10, 16))
    (tmp_path / "b2" / "episode_0.hdf5").rename(src / "episode_2.hdf5")
    with pytest.raises(DataError, match=r"episode_2\.hdf5 \[observations/images/top\].*\(12, 16, 3\).*\(10, 16, 3\)"):
        convert(src, tmp_path / "o2.zarr", progress=False)

    src = make_aloha(tmp_path / "c", n=2)
    (src / "episode_01.hdf5").write_bytes((src / "episode_1.hdf5").read_bytes())  # index 1 twice
    with pytest.raises(DataError, match="one file per episode index"):
        convert(src, tmp_path / "o3.zarr", progress=False)

    src = make_aloha(tmp_path / "d", n=1, cams=("top",))
    make_aloha(tmp_path / "d2", n=1, cams=("top", "wrist"))
    (tmp_path / "d2" / "episode_0.hdf5").rename(src / "episode_1.hdf5")
    with pytest.raises(DataError, match=r"episode_1\.hdf5 \[observations/images\].*\['top'\]"):
        convert(src, tmp_path / "o4.zarr", progress=False)


def test_malformed_npz(tmp_path):
    src = make_npz(tmp_path / "n", n=2)
    with pytest.raises(DataError, match=r"ep0\.npz \[acts\]: expected npz keys"):
        convert(src, tmp_path / "o.zarr", key_map={"action": "acts"}, progress=False)
    (src / "ep1.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"ep1\.npz: expected a readable \.npz file"):
        convert(src, tmp_path / "o2.zarr", key_map={"action": "actions"}, progress=False)
    src = make_npz(tmp_path / "m", n=1)
    np.savez(src / "ep1.npz", observations=np.zeros((3, 4)), actions=np.array([{"a": 1}] * 3, dtype=object))
    with pytest.raises(DataError, match=r"ep1\.npz.*readable arrays"):
        convert(src, tmp_path / "o3.zarr", key_map={"action": "actions"}, progress=False)


def test_unknown_layout_and_foreign_resume(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="no known layout"):
        convert(tmp_path / "junk", tmp_path / "o.zarr", progress=False)
    convert(make_npz(tmp_path / "n"), tmp_path / "o.zarr", key_map={"action": "actions"}, progress=False)
    with pytest.raises(DataError, match=r"o\.zarr \[attrs/provenance\]: expected a partial conversion"):
        convert(make_robomimic(tmp_path / "r.hdf5"), tmp_path / "o.zarr", progress=False)


CONVERTER = "import sys; from protege.cli import main; sys.exit(main(['convert', sys.argv[1], sys.argv[2]]))"


def test_conversion_killed_then_resumed_matches_a_clean_one(tmp_path):
    src = make_robomimic(tmp_path / "big.hdf5", lengths=[40] * 40, image=(64, 64))
    out = tmp_path / "out.zarr"
    proc = subprocess.Popen([sys.executable, "-c", CONVERTER, str(src), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once a few episodes are committed
        try:
            if ReplayBuffer.open(out).n_episodes >= 3:
                break
        except DataError:
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ReplayBuffer.open(out).n_episodes
    assert 3 <= partial < 40
    assert main(["convert", str(src), str(out)]) == 0
    clean = convert(src, tmp_path / "clean.zarr", progress=False)
    resumed = ReplayBuffer.open(out)
    assert resumed.n_episodes == 40
    for k in clean.keys():
        np.testing.assert_array_equal(np.asarray(resumed.data[k][:]), np.asarray(clean.data[k][:]), err_msg=k)


def test_validate_cli(tmp_path, capsys):
    buf = convert(make_npz(tmp_path / "n"), tmp_path / "o.zarr", key_map={"action": "actions"}, progress=False)
    assert main(["validate", str(tmp_path / "o.zarr")]) == 0
    assert "valid" in capsys.readouterr().out
    buf.data["action"][1] = np.nan  # corrupt a stored value behind the buffer's back
    assert main(["validate", str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err
    assert "data/action" in err and "finite" in err and "episode 0" in err


def test_inspect_shows_instructions_and_filter_keys(tmp_path, capsys):
    import re

    make_ours(tmp_path / "lang.zarr", n=3)  # episodes of 8, 9, 10 steps with tasks 0, 1, 0
    assert main(["inspect", str(tmp_path / "lang.zarr")]) == 0
    out = capsys.readouterr().out
    assert "tasks (2 instructions; steps):" in out
    assert re.search(r"0\s+18\s+'push the cube'", out) and re.search(r"1\s+9\s+'lift'", out), out
    assert "obs/front" in out and "jpeg:95, 1 frame/chunk" in out

    convert(make_robomimic(tmp_path / "r.hdf5", lengths=(5, 7, 4, 6)), tmp_path / "r.zarr", progress=False)
    assert main(["inspect", str(tmp_path / "r.zarr")]) == 0
    out = capsys.readouterr().out
    assert "filter keys (robomimic masks; episodes of 4):" in out
    assert re.search(r"train\s+2\n", out) and re.search(r"valid\s+1\n", out), out
    assert "tasks (" not in out


# ------------------------------------------------------------------ LeRobot
def make_ours(path, n=3, fps=10, image=(32, 48)):
    rng = np.random.default_rng(1)
    buf = ReplayBuffer.create(path, fps=fps, attrs={"tasks": ["push the cube", "lift"], "units": {"action": "m/s"},
                                                    "provenance": {"source": "unit test"}})
    yy, xx = np.mgrid[0 : image[0], 0 : image[1]]
    for e in range(n):
        T = 8 + e
        img = np.stack([np.stack([(xx * 5 + t * 3 + e * 20) % 256, (yy * 7) % 256, np.full_like(xx, 100)], -1)
                        for t in range(T)]).astype(np.uint8)  # smooth frames, like camera images
        buf.append_episode({"obs/state": rng.standard_normal((T, 5)).astype(np.float32),
                            "action": rng.standard_normal((T, 3)).astype(np.float32),
                            "obs/front": img, "task": np.full(T, e % 2, np.int64), "reward": rng.random(T)})
    return buf


def test_round_trip_ours_lerobot_v3_ours(tmp_path):
    import pyarrow.parquet as pq

    from protege.datasets.adapters.lerobot import export as export_lerobot

    ours = make_ours(tmp_path / "ours.zarr")
    assert main(["convert", str(tmp_path / "ours.zarr"), str(tmp_path / "lr"), "--to", "lerobot"]) == 0
    info = json.loads((tmp_path / "lr" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_frames"] == ours.n_steps and info["fps"] == 10
    assert info["features"]["observation.images.front"]["dtype"] == "video"
    assert pq.read_table(tmp_path / "lr" / "data" / "chunk-000" / "file-000.parquet").column("index").to_pylist() == list(range(ours.n_steps))
    back = convert(tmp_path / "lr", tmp_path / "back.zarr", progress=False)
    for i in range(ours.n_episodes):
        a, b = ours.get_episode(i), back.get_episode(i)
        assert set(a) == set(b)
        for k in a:
            if k == "obs/front":  # lossy AV1: within codec tolerance
                assert np.abs(a[k].astype(int) - b[k].astype(int)).mean() < 6, k
            else:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
                assert a[k].dtype == b[k].dtype
    assert back.attrs["tasks"] == ["push the cube", "lift"] and back.attrs["units"] == {"action": "m/s"}
    assert back.kinds == ours.kinds and back.fps == ours.fps
    assert back.attrs["provenance"]["origin"] == {"source": "unit test"}
    with pytest.raises(DataError, match="existing path"):
        export_lerobot(ours, tmp_path / "lr")


def make_v21(folder, n=2, T=6, fps=10):
    """A LeRobot v2.1 dataset as lerobot 0.3.3 lays it out: one parquet and one mp4 per episode."""
    import av
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    (folder / "meta").mkdir(parents=True)
    info = {"codebase_version": "v2.1", "robot_type": "so100", "total_episodes": n, "total_frames": n * T, "total_tasks": 1,
            "total_videos": n, "total_chunks": 1, "chunks_size": 1000, "fps": fps, "splits": {"train": f"0:{n}"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {"action": {"dtype": "float32", "shape": [2], "names": None},
                         "observation.state": {"dtype": "float32", "shape": [2], "names": None},
                         "observation.images.top": {"dtype": "video", "shape": [16, 16, 3], "names": ["height", "width", "channels"]},
                         **{k: {"dtype": d, "shape": [1], "names": None} for k, d in
                            [("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"), ("index", "int64"), ("task_index", "int64")]}}}
    (folder / "meta" / "info.json").write_text(json.dumps(info))
    (folder / "meta" / "tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": "stack"}) + "\n")
    (folder / "meta" / "episodes.jsonl").write_text("".join(json.dumps({"episode_index": i, "tasks": ["stack"], "length": T}) + "\n" for i in range(n)))
    for i in range(n):
        (folder / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        vec = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), 2)  # noqa: E731
        pq.write_table(pa.table({"action": vec(rng.standard_normal((T, 2)).astype(np.float32)),
                                 "observation.state": vec(rng.standard_normal((T, 2)).astype(np.float32)),
                                 "timestamp": pa.array((np.arange(T) / fps).astype(np.float32)), "frame_index": pa.array(np.arange(T)),
                                 "episode_index": pa.array(np.full(T, i)), "index": pa.array(np.arange(i * T, (i + 1) * T)),
                                 "task_index": pa.array(np.zeros(T, np.int64))}),
                       folder / "data" / "chunk-000" / f"episode_{i:06d}.parquet")
        vdir = folder / "videos" / "chunk-000" / "observation.images.top"
        vdir.mkdir(parents=True, exist_ok=True)
        with av.open(str(vdir / f"episode_{i:06d}.mp4"), "w") as c:
            s = c.add_stream("h264", rate=fps)
            s.pix_fmt, s.height, s.width = "yuv420p", 16, 16
            for t in range(T):
                f = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 40 * t, np.uint8), format="rgb24")
                f.pts = t
                for p in s.encode(f):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    return folder


def test_lerobot_v21_import(tmp_path):
    buf = convert(make_v21(tmp_path / "v21"), tmp_path / "o.zarr", progress=False)
    assert buf.n_episodes == 2 and buf.fps == 10 and buf.attrs["tasks"] == ["stack"]
    assert set(buf.keys()) == {"action", "obs/state", "obs/top", "task"}
    top = buf.get_episode(1)["obs/top"]
    assert top.shape == (6, 16, 16, 3) and abs(int(top[3].mean()) - 120) <= 6  # frame t has value 40 t


def _edit_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def test_malformed_lerobot(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def fresh(name):
        return make_v21(tmp_path / name)

    src = fresh("version")
    _edit_json(src / "meta" / "info.json", codebase_version="v9.9")
    with pytest.raises(DataError, match=r"info\.json \[codebase_version\]: expected one of \('v2\.1', 'v3\.0'\), found 'v9\.9'"):
        convert(src, tmp_path / "o1.zarr", progress=False)

    src = fresh("novideo")
    (src / "videos" / "chunk-000" / "observation.images.top" / "episode_000001.mp4").unlink()
    with pytest.raises(DataError, match=r"episode_000001\.mp4 \[observation\.images\.top\]: expected the episode's video file, found missing"):
        convert(src, tmp_path / "o2.zarr", progress=False)
    assert ReplayBuffer.open(tmp_path / "o2.zarr").n_episodes == 1  # episode 0 complete, nothing of episode 1

    src = fresh("corrupt")
    video = src / "videos" / "chunk-000" / "observation.images.top" / "episode_000000.mp4"
    video.write_bytes(b"\x00" * 64 + video.read_bytes()[200:])
    with pytest.raises(DataError, match=r"episode_000000\.mp4 \[observation\.images\.top\]: expected (a decodable mp4|6 frames)"):
        convert(src, tmp_path / "o3.zarr", progress=False)

    src = fresh("timestamps")
    f = src / "data" / "chunk-000" / "episode_000000.parquet"
    t = pq.read_table(f)
    ts = t.column("timestamp").to_numpy().copy()
    ts[3] = ts[1]
    pq.write_table(t.set_column(t.column_names.index("timestamp"), "timestamp", pa.array(ts)), f)
    with pytest.raises(DataError, match=r"episode_000000\.parquet \[timestamp\]: expected strictly increasing"):
        convert(src, tmp_path / "o4.zarr", progress=False)

    src = fresh("dup")
    (src / "meta" / "episodes.jsonl").write_text("".join(json.dumps({"episode_index": 0, "tasks": [], "length": 6}) + "\n" for _ in range(2)))
    with pytest.raises(DataError, match=r"episodes\.jsonl \[episode_index\]: expected each episode index once, found episode 0 2 times"):
        convert(src, tmp_path / "o5.zarr", progress=False)

    src = fresh("length")
    (src / "meta" / "episodes.jsonl").write_text("".join(json.dumps({"episode_index": i, "tasks": [], "length": 7}) + "\n" for i in range(2)))
    with pytest.raises(DataError, match=r"episode_000000\.parquet \[episode_index\]: expected 7 rows"):
        convert(src, tmp_path / "o6.zarr", progress=False)

    src = fresh("nodata")
    (src / "data" / "chunk-000" / "episode_000000.parquet").unlink()
    with pytest.raises(DataError, match=r"episode_000000\.parquet: expected the data parquet of episode 0, found missing"):
        convert(src, tmp_path / "o7.zarr", progress=False)


def test_convert_into_an_fsspec_memory_store(tmp_path, capsys):
    src = make_npz(tmp_path / "n", n=3)
    buf = convert(src, "memory://adapters/out.zarr", key_map={"action": "actions", "obs/state": "observations"}, progress=False)
    again = ReplayBuffer.open("memory://adapters/out.zarr")
    assert again.n_episodes == 3 and again.path == "memory://adapters/out.zarr"
    np.testing.assert_array_equal(again.get_episode(2)["obs/state"], buf.get_episode(2)["obs/state"])
    assert main(["inspect", "memory://adapters/out.zarr"]) == 0
    out = capsys.readouterr().out
    assert "min [" in out and "mean [" in out and "provenance" in out and "npz" in out


def test_lerobot_export_refuses_what_it_cannot_represent(tmp_path):
    from protege.datasets.adapters.lerobot import export as export_lerobot

    buf = ReplayBuffer.create(tmp_path / "b.zarr", fps=10, attrs={"tasks": ["only one"]})
    buf.append_episode({"action": np.zeros((3, 2), np.float32), "task": np.array([0, 1, 0])})
    with pytest.raises(DataError, match=r"\[task\]: expected indices into attrs\['tasks'\] \(1 strings\), found index 1"):
        export_lerobot(buf, tmp_path / "lr")
    odd = ReplayBuffer.create(tmp_path / "odd.zarr", fps=7.5)
    odd.append_episode({"action": np.zeros((3, 2), np.float32)})
    with pytest.raises(DataError, match="integer frame rate"):
        export_lerobot(odd, tmp_path / "lr2")
    assert not (tmp_path / "lr").exists() and not (tmp_path / "lr2").exists()
