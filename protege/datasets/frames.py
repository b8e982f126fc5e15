"""Camera frames in the replay buffer: a per-frame image codec for zarr v3, the storage options
(`--image-codec jpeg[:quality]|png|raw`, `--resize HxW`) and lazy frame sequences.

Why imagecodecs: it is maintained (releases track libjpeg-turbo / libpng / zlib-ng), ships manylinux
wheels with those libraries inside, encodes and decodes straight from/to numpy without copies and
releases the GIL. Its numcodecs classes (`imagecodecs.numcodecs.Jpeg`, `.Png`) are zarr *v2*
codecs; zarr v3 wraps numcodecs codecs only through a private factory (`numcodecs.zarr3`), so the
registered v3 codec below is ~50 lines over `imagecodecs.jpeg8_encode/decode` and
`png_encode/decode` instead. It is registered under the name `protege_image` (on import of this
module and through the `zarr.codecs` entry point), so plain `zarr.open` reads the frames too.

Layout of an image key: one frame per chunk, i.e. one complete JPEG/PNG file per frame, so a
training window reads and decodes only the frames it needs. `read_frames` fetches those chunks
straight from the store and decodes them in the calling process: zarr 3.1's generic read path
measured 2-10 ms per one-frame chunk here (an asyncio task and a thread hop per chunk, and
orthogonal selections gather every pixel through fancy indexing), the direct read ~0.3-1 ms at
240x320. Chunk keys come from the array's own metadata, so any zarr store works.
(zarr's sharding codec, many frames per file, was measured too: a single-frame read then costs an
extra index read, ~2x slower; one file per frame it is.)
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec

from protege.errors import ConfigError, DataError

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

CODEC_NAME = "protege_image"
DEFAULT_JPEG_QUALITY = 95


@dataclass(frozen=True)
class ImageCodec(ArrayBytesCodec):
    """zarr v3 array->bytes codec: each chunk is one uint8 frame (1, H, W, C), stored as one JPEG or PNG."""

    is_fixed_size = False
    format: str = "jpeg"
    quality: int = DEFAULT_JPEG_QUALITY  # JPEG quality 1-100; PNG: zlib level
    # Full-resolution chroma: libjpeg's default 4:2:0 halves colour resolution, and on small frames a
    # few-pixel object then bleeds its colour (max error 118 grey levels vs 20 on the 32x32 point-mass
    # camera, measured) for ~10% fewer bytes. Colour identifies objects in many tasks.
    subsampling: str = "444"

    def __post_init__(self) -> None:
        if self.format not in ("jpeg", "png"):
            raise ValueError(f"{CODEC_NAME}: format must be 'jpeg' or 'png', got {self.format!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        _, config = parse_named_configuration(data, CODEC_NAME)
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        config = {"format": self.format, "quality": self.quality}
        if self.format == "jpeg":
            config["subsampling"] = self.subsampling
        return {"name": CODEC_NAME, "configuration": config}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        chunk = getattr(chunk_grid, "chunk_shape", None)
        if dtype.to_native_dtype() != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3, 4):
            raise ValueError(f"{CODEC_NAME}: needs uint8 frames (T, H, W, C), got {dtype} {shape}")
        if chunk is not None and chunk[0] != 1:
            raise ValueError(f"{CODEC_NAME}: needs one frame per chunk, got chunks {chunk}")
        if self.format == "jpeg" and shape[-1] == 4:
            raise ValueError(f"{CODEC_NAME}: JPEG has no alpha channel; store 4-channel frames as png")

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size

    # Decoding runs inline, not in a thread pool as zarr's Blosc does: a DataLoader worker then uses
    # exactly one core, and the workers are the parallelism.
    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        frame = decode_frame(chunk_bytes.as_numpy_array(), self.format)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(frame.reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = encode_frame(chunk_array.as_numpy_array()[0], self.format, self.quality, self.subsampling)
        return chunk_spec.prototype.buffer.from_bytes(data)


register_codec(CODEC_NAME, ImageCodec)


def encode_frame(frame: np.ndarray, fmt: str, quality: int, subsampling: str = "444") -> bytes:
    """One (H, W, C) uint8 frame -> JPEG/PNG bytes (channel order kept: RGB in, RGB out)."""
    img = frame[..., 0] if frame.shape[-1] == 1 else frame  # libjpeg/libpng take grey as (H, W)
    if fmt == "jpeg":
        return imagecodecs.jpeg8_encode(np.ascontiguousarray(img), level=quality, subsampling=subsampling)
    return imagecodecs.png_encode(np.ascontiguousarray(img), level=quality)


def decode_frame(data: np.ndarray | bytes, fmt: str) -> np.ndarray:
    frame = imagecodecs.jpeg8_decode(data) if fmt == "jpeg" else imagecodecs.png_decode(data)
    return frame[..., None] if frame.ndim == 2 else frame


# ---------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class ImageStorage:
    """How a buffer stores image keys: `codec` jpeg|png|raw, `quality` (JPEG), `resize` (H, W) or None."""

    codec: str = "jpeg"
    quality: int = DEFAULT_JPEG_QUALITY
    resize: tuple[int, int] | None = None

    @classmethod
    def parse(cls, codec: str | None = None, resize: str | tuple[int, int] | list[int] | None = None) -> ImageStorage:
        """From the CLI strings: codec `jpeg[:quality]|png|raw` (None: JPEG 95), resize `HxW` (None: keep)."""
        return cls(*parse_codec(codec or "jpeg"), resize=parse_resize(resize))

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any] | None) -> ImageStorage:
        if not attrs:
            return cls()
        resize = attrs.get("resize")
        return cls(attrs.get("codec", "jpeg"), int(attrs.get("quality", DEFAULT_JPEG_QUALITY)),
                   tuple(resize) if resize else None)

    def to_attrs(self) -> dict[str, Any]:
        return {"codec": self.codec, "quality": self.quality, "resize": list(self.resize) if self.resize else None}

    def spec(self) -> str:
        s = f"{self.codec}:{self.quality}" if self.codec == "jpeg" else self.codec
        return s + (f", resize {self.resize[0]}x{self.resize[1]}" if self.resize else "")

    def serializer(self, channels: int) -> ImageCodec | None:
        """The zarr serializer for frames with `channels` channels; None: raw bytes (then Blosc)."""
        if self.codec == "raw":
            return None
        # JPEG has no alpha: 4-channel frames (RGBA/RGB-D) are kept lossless as PNG.
        fmt = "png" if channels == 4 else self.codec
        return ImageCodec(fmt, self.quality if fmt == "jpeg" else PNG_LEVEL)


PNG_LEVEL = 3  # zlib level: on noisy 240x320 frames 2% larger than level 6 at 0.6x its encode time (measured)


def parse_codec(spec: str) -> tuple[str, int]:
    m = re.fullmatch(r"(jpeg|jpg|png|raw)(?::(\d+))?", spec.strip().lower())
    if not m or (m.group(2) and m.group(1) not in ("jpeg", "jpg")) or (m.group(2) and not 1 <= int(m.group(2)) <= 100):
        raise ConfigError(f"--image-codec {spec!r}: expected jpeg[:quality 1-100], png or raw")
    name = "jpeg" if m.group(1) == "jpg" else m.group(1)
    return name, int(m.group(2) or DEFAULT_JPEG_QUALITY)


def parse_resize(resize: str | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if resize is None or resize == "":
        return None
    if isinstance(resize, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", resize)
        if not m:
            raise ConfigError(f"--resize {resize!r}: expected HxW, e.g. 240x320")
        resize = (int(m.group(1)), int(m.group(2)))
    h, w = (int(v) for v in resize)
    if h <= 0 or w <= 0:
        raise ConfigError(f"--resize {resize!r}: expected positive height and width")
    return h, w


# ---------------------------------------------------------------------------------- lazy frames
class LazyFrames:
    """A time-major frame sequence read on demand (e.g. the JPEG rows of an hdf5 file), so an
    episode is written a few frames at a time: `append_episode` accepts it in place of an array.
    numpy-like `shape`/`ndim`/`dtype`/`len`; subclasses implement `__getitem__(slice)`."""

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.uint8) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:  # whole sequence (tests, small data)
        arr = self[0 : len(self)]
        return arr if dtype is None else arr.astype(dtype)


class Resized(LazyFrames):
    """Frames of `src` (array or LazyFrames) resized to (H, W) as they are read (area filter)."""

    def __init__(self, src: Any, size: tuple[int, int]) -> None:
        super().__init__((len(src), *size, src.shape[-1]))
        self.src, self.size = src, size

    def __getitem__(self, sl: slice) -> np.ndarray:
        return resize_frames(np.asarray(self.src[sl]), self.size)


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, C) uint8 -> (T, h, w, C): OpenCV's INTER_AREA (pixel-area averaging, no aliasing
    when shrinking; bilinear when enlarging)."""
    import cv2

    h, w = size
    if frames.shape[1:3] == (h, w):
        return frames
    interp = cv2.INTER_AREA if h <= frames.shape[1] and w <= frames.shape[2] else cv2.INTER_LINEAR
    out = np.empty((len(frames), h, w, frames.shape[-1]), np.uint8)
    for i, f in enumerate(frames):
        out[i] = cv2.resize(f, (w, h), interpolation=interp).reshape(h, w, -1)
    return out


def frame_codec(arr: Any) -> ImageCodec | None:
    """The image codec of a zarr array stored one frame per chunk, else None."""
    codecs = list(getattr(getattr(arr, "metadata", None), "codecs", []) or [])
    if len(codecs) == 1 and isinstance(codecs[0], ImageCodec) and arr.chunks[0] == 1:
        return codecs[0]
    return None


def describe_codec(arr: Any) -> str:
    """How a zarr array stores its chunks, e.g. 'jpeg:95, 1 frame/chunk' or 'raw+blosc'."""
    codec = frame_codec(arr)
    if codec is not None:
        return (f"jpeg:{codec.quality}" if codec.format == "jpeg" else "png") + ", 1 frame/chunk"
    codecs = list(getattr(getattr(arr, "metadata", None), "codecs", []) or [])
    names = [type(c).__name__.replace("Codec", "").lower() for c in codecs if type(c).__name__ != "BytesCodec"]
    per = ", 1 frame/chunk" if arr.chunks[0] == 1 else ""
    return "raw" + (f"+{'+'.join(names)}" if names else "") + per


def read_frames(arr: Any, steps: np.ndarray, path: object = "<buffer>") -> np.ndarray:
    """Decoded frames at the sorted unique `steps` of an array with `frame_codec(arr)`: one chunk
    fetch and one decode per frame, in this process. Local stores are read with plain file reads;
    other stores (fsspec URLs, memory) fetch all chunks concurrently in one event-loop call."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    codec = frame_codec(arr)
    store, frame_shape = arr.store, arr.shape[1:]
    keys = [f"{arr.path}/{arr.metadata.encode_chunk_key((int(i),) + (0,) * len(frame_shape))}" for i in steps]
    if isinstance(store, LocalStore):
        blobs = [_read_file(store.root / k) for k in keys]
    else:
        async def fetch() -> list[Any]:
            proto = default_buffer_prototype()
            return list(await asyncio.gather(*(store.get(k, prototype=proto) for k in keys)))

        blobs = [None if b is None else b.as_numpy_array() for b in sync(fetch())]
    out = np.zeros((len(steps), *frame_shape), np.uint8)  # a missing chunk is an all-fill-value (0) frame
    for j, blob in enumerate(blobs):
        if blob is None:
            continue
        try:
            frame = decode_frame(blob, codec.format)
        except Exception as e:  # noqa: BLE001 - imagecodecs raises its own error classes per codec
            raise DataError(path, f"{arr.path} step {int(steps[j])}", f"a decodable {codec.format} frame", str(e)) from e
        if frame.shape != frame_shape:
            raise DataError(path, f"{arr.path} step {int(steps[j])}", f"a frame of shape {frame_shape}", f"{frame.shape}")
        out[j] = frame
    return out


def _read_file(path: Any) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
