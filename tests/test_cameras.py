"""Cameras (`protege/hardware/cameras.py`) and the runner's frame-age checks: a replay camera feeding
a camera-conditioned policy, a camera that stops delivering (the runner holds, then the watchdog stops
the robot), OpenCV reading a real video file, RealSense up to device enumeration, frame fitting."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import protege.policies.diffusion  # noqa: F401  (diffusers before mujoco, see test_runtime.py)
from protege.datasets.replay_buffer import ReplayBuffer
from protege.errors import ConfigError
from protege.hardware.cameras import CameraError, OpenCVCamera, ReplayCamera, fit_frame
from protege.hardware.mujoco_robot import MujocoRobot
from protege.policies.base import Policy
from protege.runtime.runner import Runner, RunnerSettings


class CameraGoalPolicy(Policy):
    """Reach policy (state = [ee_pos, goal]) that also takes the `front` image, and checks what it gets."""

    def __init__(self, image_shape: tuple[int, int, int] = (32, 32, 3)) -> None:
        meta = {"obs/state": {"shape": [6], "kind": "state"}, "obs/front": {"shape": list(image_shape), "kind": "image"},
                "action": {"shape": [4], "kind": "action"}}
        super().__init__(meta, n_obs_steps=1, horizon=3, n_action_steps=2)
        self.dummy = torch.nn.Linear(1, 1)
        self.image_shape, self.images = image_shape, []

    def predict_action(self, obs):  # noqa: ANN001, ANN201
        img = obs["obs/front"]
        assert tuple(img.shape[2:]) == self.image_shape and img.dtype == torch.uint8, img.shape
        self.images.append(int(img[0, -1, 0, 0, 0]))  # the frame index painted into the replayed frames
        s = obs["obs/state"][:, -1].double()
        step = torch.clamp(s[:, 3:6] - s[:, 0:3], -0.02, 0.02)
        a = torch.cat([step, torch.full_like(step[:, :1], 0.08)], -1)
        return a[:, None].repeat(1, self.n_action_steps, 1).float()


@pytest.fixture
def frames_buffer(tmp_path):  # noqa: ANN001, ANN201
    """A replay buffer with 48x64 frames whose pixel values count the frames (0, 1, 2, ...)."""
    n = 40
    frames = np.zeros((n, 48, 64, 3), np.uint8) + np.arange(n, dtype=np.uint8)[:, None, None, None]
    buf = ReplayBuffer.create(str(tmp_path / "frames.zarr"), fps=20)
    buf.append_episode({"obs/front": frames, "action": np.zeros((n, 4), np.float32)}, kinds={"obs/front": "image"})
    return tmp_path / "frames.zarr"


def camera_runner(tmp_path, policy, camera: dict, **settings):  # noqa: ANN001, ANN003, ANN201
    from protege.envs.franka import make_task

    robot = MujocoRobot(realtime=True, cameras={"front": camera})
    s = RunnerSettings(rate_hz=20, max_steps=30, watchdog_timeout=0.3, stop_on_success=False, temporal_ensemble=None,
                       out_dir=str(tmp_path / "run"), inference="thread", max_frame_age=0.15)
    for k, v in settings.items():
        setattr(s, k, v)
    task = make_task("reach")
    return Runner(policy, robot, "ee_delta", task.state_keys, None, task, s), robot


def test_replay_camera_feeds_policy_and_recording(tmp_path, frames_buffer) -> None:  # noqa: ANN001
    policy = CameraGoalPolicy()
    runner, robot = camera_runner(tmp_path, policy, {"backend": "replay", "path": str(frames_buffer), "key": "obs/front",
                                                     "fps": 40})
    report = runner.run()
    robot.close()
    assert report["status"] == "completed", report["message"]
    assert report["stale_frames"] == 0 and report["frame_age_ms_p99"] < 150
    assert len(set(policy.images)) > 5  # fresh frames reached the policy, not one frame over and over
    buf = ReplayBuffer.open(tmp_path / "run" / "recording.zarr")
    buf.validate_data()
    n = buf.n_steps
    assert buf["obs/front"].shape[1:] == (32, 32, 3)  # 48x64 replayed, centre-cropped and resized
    t = buf["camera/front_t"][:n]
    assert np.isfinite(t).all() and np.all(np.diff(t) >= 0) and t[-1] > t[0]


def test_camera_that_stops_delivering_holds_then_watchdog(tmp_path, frames_buffer) -> None:  # noqa: ANN001
    """The replay camera ends after 40 frames at 40 Hz (~1 s) like an unplugged camera: its last frame
    ages past max_frame_age, the runner stops requesting actions, holds, and the watchdog stops the arm."""
    runner, robot = camera_runner(tmp_path, CameraGoalPolicy(), {"backend": "replay", "path": str(frames_buffer),
                                                                 "key": "obs/front", "fps": 40, "loop": False},
                                  max_steps=200)
    report = runner.run()
    cam = robot.camera_set.cameras["front"]
    robot.close()
    assert report["status"] == "watchdog" and report["exit_code"] == 3, report["message"]
    assert "frames too old" in report["message"] and report["stale_frames"] >= 3
    assert "end of the recording" in cam.error
    assert robot.stopped and report["ticks"] < 60
    buf = ReplayBuffer.open(tmp_path / "run" / "recording.zarr")
    buf.validate_data()
    held = buf["runner/held"][: buf.n_steps].astype(bool)
    assert held[-3:].all() and not held[:10].any()


def test_unknown_or_missing_camera_is_a_clear_error(tmp_path, frames_buffer) -> None:  # noqa: ANN001
    from protege.envs.franka import make_task

    robot = MujocoRobot(realtime=True, cameras={"wrist_cam": {"backend": "replay", "path": str(frames_buffer),
                                                              "key": "obs/front"}})
    with pytest.raises(ConfigError, match=r"camera\(s\) \['front'\].*its cameras: \['wrist_cam'\]"):
        Runner(CameraGoalPolicy(), robot, "ee_delta", make_task("reach").state_keys, None, make_task("reach"),
               RunnerSettings(rate_hz=20, max_steps=5))
    runner, robot = camera_runner(tmp_path, CameraGoalPolicy(), {"backend": "opencv", "device": str(tmp_path / "none.mp4")})
    report = runner.run()
    assert report["status"] == "robot_error" and "cannot open device" in report["message"]
    assert report["ticks"] == 0
    with pytest.raises(ConfigError, match="cameras.front.backend"):
        MujocoRobot(cameras={"front": {"backend": "usb3"}})


def test_opencv_reads_a_real_video_file(tmp_path) -> None:  # noqa: ANN001
    import imageio.v3 as iio

    frames = np.zeros((30, 64, 80, 3), np.uint8)
    frames[:, :, :40, 0] = 200  # left half red, right half blue
    frames[:, :, 40:, 2] = 200
    path = tmp_path / "clip.mp4"
    iio.imwrite(path, frames, fps=30, codec="libx264")
    cam = OpenCVCamera("side", device=str(path))
    cam.start()
    f = cam.latest()
    assert f.image.shape == (64, 80, 3) and f.index >= 1 and f.t <= time.monotonic()
    assert f.image[:, :30, 0].mean() > 150 and f.image[:, 50:, 2].mean() > 150  # RGB order, not OpenCV's BGR
    deadline = time.monotonic() + 5
    while cam.error is None and time.monotonic() < deadline:  # the end of the file stops delivery
        time.sleep(0.01)
    assert cam.error is not None and "no frame" in cam.error and cam.frames == 30
    cam.stop()


def test_realsense_up_to_device_enumeration() -> None:
    pytest.importorskip("pyrealsense2", exc_type=ImportError)
    from protege.hardware.cameras import RealSenseCamera, realsense_serials

    serials = realsense_serials()
    if serials:
        pytest.skip(f"a RealSense is connected ({serials}); this test covers the no-device path")
    with pytest.raises(CameraError, match="no RealSense device connected"):
        RealSenseCamera("front", depth=True).start()


def test_fit_frame_crops_and_resizes() -> None:
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, 8:56] = 255  # the centre 48x48 square is white, the side strips black
    out = fit_frame(img, (24, 24, 3))
    assert out.shape == (24, 24, 3) and out.min() == 255  # cropped to the centre square, then shrunk
    assert fit_frame(img, (48, 64, 3)) is img
    with pytest.raises(CameraError, match="expects"):
        fit_frame(img[..., :1], (24, 24, 3), "front")
