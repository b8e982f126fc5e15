"""Cameras: one small protocol (start, latest frame with its capture timestamp, stop) and its backends.

- `OpenCVCamera`: any UVC/V4L2 webcam (or a video file) through OpenCV's `VideoCapture`;
- `RealSenseCamera`: Intel RealSense via `pyrealsense2` (imported lazily), colour and optional depth
  aligned to colour;
- `MujocoCamera`: a camera of a MuJoCo sim backend, rendered from the simulation;
- `ReplayCamera`: frames of a video file (imageio) or of a replay buffer's image key, for tests and
  offline replay.

Live cameras run off the control loop in their own thread and keep only the newest frame (a reader
never gets a backlog). A frame's `t` is its capture time on the clock the camera was attached to
(`attach(clock)`: the robot's clock, so the runner can compute a frame's age as `clock.now() - t`).
A camera that stops delivering keeps returning its last frame, whose age grows: the runner holds and
its watchdog stops the run (`runner.max_frame_age`). `CameraSet` builds a robot's cameras from the
hardware config's `cameras:` mapping (name -> backend + options). `fit_frame` crops/resizes a frame to
what a checkpoint expects.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from protege.errors import ConfigError, ProtegeError

log = logging.getLogger("protege.hardware")


class CameraError(ProtegeError):
    """A camera cannot deliver frames: library or device missing, device unplugged, no frame in time."""


@dataclass
class Frame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    t: float  # capture time, seconds on the camera's clock
    index: int  # 1 for the first frame delivered since start()
    depth: np.ndarray | None = None  # (H, W) float32 metres, aligned to `image` (RealSense with depth=True)


class Camera(Protocol):
    name: str

    def attach(self, clock: Callable[[], float]) -> None: ...
    def start(self) -> None: ...
    def latest(self) -> Frame | None: ...
    def stop(self) -> None: ...


_RUNNING: weakref.WeakSet = weakref.WeakSet()  # cameras with a live thread


@atexit.register
def _stop_all() -> None:
    """Stop camera threads before the interpreter tears down: a daemon thread still inside an OSMesa
    render at exit segfaults the process."""
    for cam in list(_RUNNING):
        cam.stop()


class ThreadedCamera:
    """A camera whose frames are grabbed by a background thread into a one-frame slot.

    Subclasses implement `_open()`, `_grab() -> (image, depth | None, capture time | None)` (blocking
    until the next frame; raises CameraError when the device is gone; time None: stamped on arrival)
    and `_close()`. `start()` waits up to `start_timeout` s
    for the first frame and raises CameraError otherwise, so a missing camera fails before the robot moves."""

    backend = ""

    def __init__(self, name: str, start_timeout: float = 5.0) -> None:
        self.name, self.start_timeout = name, float(start_timeout)
        self.clock: Callable[[], float] = time.monotonic
        self._frame: Frame | None = None
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._first = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why the thread stopped delivering
        self.frames = 0

    def attach(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def start(self) -> None:
        if self._thread is not None:
            return
        self._open()
        self._running.set()
        self._first.clear()
        self.error, self.frames, self._frame = None, 0, None
        self._thread = threading.Thread(target=self._loop, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        _RUNNING.add(self)
        if not self._first.wait(self.start_timeout):
            err = self.error
            self.stop()
            raise CameraError(f"camera {self.name!r} ({self.backend}): no frame within {self.start_timeout:g} s"
                              + (f": {err}" if err else ""))

    def latest(self) -> Frame | None:
        with self._lock:
            return self._frame

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        _RUNNING.discard(self)
        self._close()

    def _loop(self) -> None:
        try:
            self._deliver()
        finally:
            self._thread_exit()

    def _deliver(self) -> None:
        while self._running.is_set():
            try:
                grabbed = self._grab()
            except Exception as e:  # noqa: BLE001 - an unplugged device: stop delivering; the runner holds
                self.error = f"{type(e).__name__}: {e}"
                log.error("camera %r (%s) stopped delivering: %s", self.name, self.backend, self.error)
                return
            if grabbed is None:  # no frame this time (e.g. paced replay between frames)
                continue
            image, depth, t = grabbed
            if t is None:  # capture time ~ arrival time: the driver hands frames over as they complete
                t = self.clock()
            self.frames += 1
            frame = Frame(image=image, t=t, index=self.frames, depth=depth)
            with self._lock:
                self._frame = frame
            self._first.set()

    def _open(self) -> None:
        pass

    def _grab(self) -> tuple[np.ndarray, np.ndarray | None, float | None] | None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def _thread_exit(self) -> None:
        """Runs on the camera thread as it ends (resources bound to that thread)."""


class OpenCVCamera(ThreadedCamera):
    """`device`: a V4L2 index (0 = /dev/video0), a device path, or a video file / stream URL."""

    backend = "opencv"

    def __init__(self, name: str, device: int | str = 0, width: int | None = None, height: int | None = None,
                 fps: float | None = None, start_timeout: float = 5.0) -> None:
        super().__init__(name, start_timeout)
        self.device, self.width, self.height, self.fps = device, width, height, fps
        self.cap: Any = None

    def _open(self) -> None:
        import cv2

        self.cap = cv2.VideoCapture(self.device)
        if not self.cap.isOpened():
            raise CameraError(f"camera {self.name!r} (opencv): cannot open device {self.device!r}")
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.width), (cv2.CAP_PROP_FRAME_HEIGHT, self.height),
                            (cv2.CAP_PROP_FPS, self.fps)):
            if value:
                self.cap.set(prop, float(value))

    def _grab(self) -> tuple[np.ndarray, None, None]:
        import cv2

        ok, bgr = self.cap.read()
        if not ok:
            raise CameraError(f"device {self.device!r} delivered no frame (unplugged, or the end of a file)")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None, None

    def _close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


def _import_realsense() -> Any:
    try:
        import pyrealsense2 as rs
    except ImportError as e:
        raise CameraError(f"RealSense cameras need pyrealsense2 (pip install pyrealsense2; it loads libusb-1.0): {e}") from e
    return rs


def realsense_serials() -> list[str]:
    """Serial numbers of the connected RealSense devices."""
    rs = _import_realsense()
    return [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()]


class RealSenseCamera(ThreadedCamera):
    """Colour (RGB8) and, with `depth=True`, depth aligned to colour (`Frame.depth`, metres)."""

    backend = "realsense"

    def __init__(self, name: str, serial: str | None = None, width: int = 640, height: int = 480, fps: int = 30,
                 depth: bool = False, start_timeout: float = 5.0) -> None:
        super().__init__(name, start_timeout)
        self.serial, self.width, self.height, self.fps, self.depth = serial, int(width), int(height), int(fps), depth
        self.pipeline: Any = None

    def _open(self) -> None:
        rs = _import_realsense()
        serials = realsense_serials()
        if not serials:
            raise CameraError(f"camera {self.name!r} (realsense): no RealSense device connected")
        if self.serial is not None and str(self.serial) not in serials:
            raise CameraError(f"camera {self.name!r} (realsense): serial {self.serial} not connected; found {serials}")
        cfg = rs.config()
        cfg.enable_device(str(self.serial or serials[0]))
        cfg.enable_stream(rs.stream.color, self.width, self.height, rs.format.rgb8, self.fps)
        if self.depth:
            cfg.enable_stream(rs.stream.depth, self.width, self.height, rs.format.z16, self.fps)
        self.pipeline = rs.pipeline()
        profile = self.pipeline.start(cfg)
        self._align = rs.align(rs.stream.color) if self.depth else None
        self._depth_scale = profile.get_device().first_depth_sensor().get_depth_scale() if self.depth else 1.0

    def _grab(self) -> tuple[np.ndarray, np.ndarray | None, None]:
        frames = self.pipeline.wait_for_frames(int(self.start_timeout * 1000))  # raises RuntimeError when unplugged
        if self._align is not None:
            frames = self._align.process(frames)
        color = np.asanyarray(frames.get_color_frame().get_data()).copy()
        depth = None
        if self._align is not None:
            depth = np.asanyarray(frames.get_depth_frame().get_data()).astype(np.float32) * self._depth_scale
        return color, depth, None

    def _close(self) -> None:
        if self.pipeline is not None:
            try:
                self.pipeline.stop()
            except RuntimeError:
                pass  # already stopped or the device is gone
            self.pipeline = None


class ReplayCamera(ThreadedCamera):
    """Plays recorded frames at `fps` in real time (looping): a video file (`path`, read with
    imageio), or a replay buffer's image key (`path` = the buffer, `key` = e.g. `obs/front`,
    optionally one `episode`)."""

    backend = "replay"

    def __init__(self, name: str, path: str, key: str | None = None, episode: int | None = None, fps: float = 30.0,
                 loop: bool = True, start_timeout: float = 5.0) -> None:
        super().__init__(name, start_timeout)
        self.path, self.key, self.episode, self.fps, self.loop = str(path), key, episode, float(fps), loop
        self.images = self._load()
        if not len(self.images):
            raise CameraError(f"camera {self.name!r} (replay): {self.path} has no frames")

    def _load(self) -> np.ndarray:
        if self.key is None:
            import imageio.v3 as iio

            try:
                return np.stack(list(iio.imiter(self.path)))
            except (OSError, ValueError) as e:
                raise CameraError(f"camera {self.name!r} (replay): cannot read video {self.path}: {e}") from e
        from protege.datasets.replay_buffer import ReplayBuffer

        buf = ReplayBuffer.open(self.path)
        if self.key not in buf.keys():
            raise CameraError(f"camera {self.name!r} (replay): {self.path} has no key {self.key!r}; "
                              f"keys: {buf.keys()}")
        span = slice(0, buf.n_steps) if self.episode is None else buf.episode_slice(self.episode)
        return np.asarray(buf[self.key][span])

    def _open(self) -> None:
        self._i, self._next = 0, time.monotonic()

    def _grab(self) -> tuple[np.ndarray, None, None]:
        if self._i >= len(self.images):
            if not self.loop:
                raise CameraError("end of the recording")
            self._i = 0
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next += 1.0 / self.fps
        image = self.images[self._i]
        self._i += 1
        return image, None, None


class MujocoCamera(ThreadedCamera):
    """A camera of a MuJoCo sim backend (`bind(robot)`), rendered at `height` x `width`.

    Real time (`realtime=True` robots): a thread renders at `fps` from snapshots of the simulation
    (`robot.snapshot()`), on its own data and GL context, like a real camera beside the control
    loop. Simulated time: `latest()` renders the current state synchronously (frame age 0), so runs
    are reproducible. Frames are drawn with `robot.render_model` when the robot has one (the same
    scene with lighter meshes), else `robot.model`."""

    backend = "mujoco"

    def __init__(self, name: str, camera: str | None = None, height: int = 96, width: int = 96, fps: float = 30.0,
                 start_timeout: float = 10.0) -> None:
        super().__init__(name, start_timeout)
        self.camera, self.height, self.width, self.fps = camera or name, int(height), int(width), float(fps)
        self.robot: Any = None
        self._renderer: Any = None
        self._data: Any = None

    def bind(self, robot: Any) -> None:
        self.robot, self._data = robot, None

    @property
    def threaded(self) -> bool:
        return self.robot is not None and bool(self.robot.realtime)

    def start(self) -> None:
        if self.robot is None:
            raise CameraError(f"camera {self.name!r} (mujoco): not bound to a MuJoCo robot")
        if self.threaded:
            super().start()

    def latest(self) -> Frame | None:
        if self.threaded:
            return super().latest()
        self.frames += 1
        if self._data is None:
            self._open()
        image, _, t = self._grab()
        return Frame(image, t, self.frames)

    def stop(self) -> None:
        if self.threaded:
            super().stop()
        else:
            self._close()

    @property
    def _model(self) -> Any:
        return getattr(self.robot, "render_model", None) or self.robot.model

    def _open(self) -> None:
        import mujoco

        self._next = time.monotonic()
        self._data = mujoco.MjData(self._model)

    def _grab(self) -> tuple[np.ndarray, None, float]:
        import mujoco

        if self.threaded:  # pace like a camera at `fps`
            delay = self._next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._next = max(self._next + 1.0 / self.fps, time.monotonic())
        t = self.robot.snapshot(self._data)  # the capture instant: the simulation state the frame shows
        mujoco.mj_kinematics(self._model, self._data)  # poses only: cameras need no dynamics
        mujoco.mj_comPos(self._model, self._data)  # subtree centres, for cameras that track them
        mujoco.mj_camlight(self._model, self._data)
        return self._render(self._data), None, t

    def _render(self, data: Any) -> np.ndarray:
        import mujoco

        if self._renderer is None:  # created in the thread that renders: a GL context is bound to its thread
            self._renderer = mujoco.Renderer(self._model, self.height, self.width)
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX):
                self._renderer.scene.flags[flag] = 0
        self._renderer.update_scene(data, camera=self.camera)
        return self._renderer.render().copy()

    def _close(self) -> None:
        if not self.threaded and self._renderer is not None:
            close_renderer(self._renderer)
            self._renderer = None

    def _thread_exit(self) -> None:
        if self._renderer is not None:  # its GL context belongs to this thread: free it here
            close_renderer(self._renderer)
            self._renderer = None


def close_renderer(renderer: Any) -> None:
    """mujoco.Renderer.close frees its GL objects after destroying its own context, i.e. in whichever
    context is current: with several renderers in one process (a vector env) that can be another
    env's, whose meshes then vanish. Free them in the renderer's own context first."""
    if getattr(renderer, "_gl_context", None) is not None and getattr(renderer, "_mjr_context", None) is not None:
        renderer._gl_context.make_current()
        renderer._mjr_context.free()
        renderer._mjr_context = None
    renderer.close()


BACKENDS: dict[str, type] = {"opencv": OpenCVCamera, "realsense": RealSenseCamera, "replay": ReplayCamera,
                             "mujoco": MujocoCamera}


def make_camera(name: str, spec: Mapping[str, Any]) -> Any:
    """One camera from its config entry: `{backend: opencv|realsense|replay|mujoco, <options>}`."""
    spec = dict(spec)
    backend = spec.pop("backend", None)
    if backend not in BACKENDS:
        raise ConfigError(f"cameras.{name}.backend: expected one of {sorted(BACKENDS)}, got {backend!r}")
    try:
        return BACKENDS[backend](name=name, **spec)
    except TypeError as e:  # an unknown option: name the camera and the key
        raise ConfigError(f"cameras.{name} ({backend}): {e}") from e


class CameraSet:
    """A robot's cameras, by name. `read()` -> ({name: image | None}, {name: capture time | None})."""

    def __init__(self, cameras: Mapping[str, Any] | None = None) -> None:
        self.cameras: dict[str, Any] = {}
        for name, cam in (cameras or {}).items():
            self.cameras[name] = make_camera(name, cam) if isinstance(cam, Mapping) else cam

    def __bool__(self) -> bool:
        return bool(self.cameras)

    def names(self) -> list[str]:
        return list(self.cameras)

    def attach(self, clock: Callable[[], float], robot: Any = None) -> None:
        for cam in self.cameras.values():
            cam.attach(clock)
            if hasattr(cam, "bind"):
                cam.bind(robot)

    def start(self) -> None:
        started = []
        try:
            for cam in self.cameras.values():
                cam.start()
                started.append(cam)
        except BaseException:
            for cam in started:
                cam.stop()
            raise

    def read(self) -> tuple[dict[str, np.ndarray | None], dict[str, float | None]]:
        frames = {n: c.latest() for n, c in self.cameras.items()}
        return ({n: f.image if f else None for n, f in frames.items()}, {n: f.t if f else None for n, f in frames.items()})

    def stop(self) -> None:
        for cam in self.cameras.values():
            try:
                cam.stop()
            except Exception as e:  # noqa: BLE001 - stopping the others matters more
                log.error("camera %r: stop failed: %s", cam.name, e)


def fit_frame(image: np.ndarray, shape: tuple[int, ...] | list[int], camera: str = "") -> np.ndarray:
    """Centre-crop `image` to the aspect ratio of `shape` (H, W, C) and resize to it (OpenCV, area
    interpolation when shrinking), so any camera resolution feeds a checkpoint trained at another."""
    h, w = int(shape[0]), int(shape[1])
    if image.ndim != 3 or image.shape[2] != int(shape[2]):
        raise CameraError(f"camera {camera!r}: frames of shape {image.shape}, the checkpoint expects {tuple(shape)}")
    if image.shape[:2] == (h, w):
        return image
    import cv2

    H, W = image.shape[:2]
    if H * w > W * h:  # too tall: crop rows
        ch = round(W * h / w)
        image = image[(H - ch) // 2 : (H - ch) // 2 + ch]
    elif H * w < W * h:  # too wide: crop columns
        cw = round(H * w / h)
        image = image[:, (W - cw) // 2 : (W - cw) // 2 + cw]
    interp = cv2.INTER_AREA if image.shape[0] > h else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interp)
