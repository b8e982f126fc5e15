"""LeRobot datasets (codebase v2.1 and v3.0) <-> replay buffer.

Layouts (from lerobot's own writer; v2.1 = lerobot 0.3.3, v3.0 = lerobot >= 0.4.0)::

    meta/info.json        codebase_version, fps, features {name: {dtype, shape, names, info}}, data_path, video_path
    v2.1: meta/episodes.jsonl {episode_index, tasks, length}   meta/tasks.jsonl {task_index, task}
          data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet            (one episode per file)
          videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4
    v3.0: meta/episodes/chunk-*/file-*.parquet  one row per episode: length, data/{chunk,file}_index,
              dataset_{from,to}_index, videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp}
          meta/tasks.parquet  (pandas index = task string, column task_index)    meta/stats.json
          data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet             (many episodes per file)
          videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4 (episodes concatenated)

Key mapping: `observation.state` <-> `obs/state`, `observation.images.<cam>` <-> `obs/<cam>`,
`observation.<x>` <-> `obs/<x>`, `action` <-> `action`, `task_index` <-> `task` (index into
attrs["tasks"]); other features keep their names. Videos are decoded with PyAV (frame at
`from_timestamp + timestamp`, within `tolerance_s`); export encodes AV1 (libsvtav1, yuv420p, g=2,
crf=30: lerobot's defaults), so images round-trip within codec tolerance and everything else exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from protege.datasets.adapters._common import check_images
from protege.datasets.replay_buffer import ReplayBuffer, check_episode_arrays
from protege.errors import DataError

VERSIONS = ("v2.1", "v3.0")
META_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")


def detect(path: Path) -> bool:
    return (path / "meta" / "info.json").is_file()


def to_buffer_key(name: str) -> str:
    if name.startswith("observation.images."):
        return "obs/" + name.removeprefix("observation.images.")
    if name.startswith("observation."):
        return "obs/" + name.removeprefix("observation.")
    return "task" if name == "task_index" else name


def to_lerobot_key(key: str, kind: str) -> str:
    if key.startswith("obs/"):
        name = key.removeprefix("obs/")
        return f"observation.images.{name}" if kind == "image" else f"observation.{name}"
    return "task_index" if key == "task" else key


def _column(table: Any, name: str) -> np.ndarray:
    """A parquet column as a (T, ...) numpy array (fixed-size or variable lists become rows)."""
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(col), -1) if len(col) else flat.reshape(0, 0)
    return col.to_numpy(zero_copy_only=False)


class Reader:
    def __init__(self, path: Path, fps: float | None = None, tolerance_s: float = 1e-4) -> None:
        import pyarrow.parquet as pq

        self.path, self.tolerance_s = path, tolerance_s
        info_path = path / "meta" / "info.json"
        try:
            self.info = json.loads(info_path.read_text())
        except FileNotFoundError as e:
            raise DataError(info_path, None, "a LeRobot meta/info.json", "missing") from e
        except json.JSONDecodeError as e:
            raise DataError(info_path, None, "valid JSON", f"invalid JSON ({e})") from e
        self.version = self.info.get("codebase_version")
        if self.version not in VERSIONS:
            raise DataError(info_path, "codebase_version", f"one of {VERSIONS}", repr(self.version))
        for key in ("fps", "features", "data_path"):
            if key not in self.info:
                raise DataError(info_path, key, "a LeRobot info.json field", "missing")
        features = self.info["features"]
        self.video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        self.image_keys = [k for k, f in features.items() if f["dtype"] == "image"]
        self.value_keys = [k for k, f in features.items()
                           if f["dtype"] not in ("video", "image", "string") and k not in META_COLUMNS]
        if "action" not in features:
            raise DataError(info_path, "features/action", "an 'action' feature", f"features {sorted(features)}")
        meta = path / "meta"
        if self.version == "v3.0":
            tasks_file = meta / "tasks.parquet"
            self.tasks = self._read_tasks_v3(tasks_file) if tasks_file.exists() else []
            files = sorted((meta / "episodes").glob("*/*.parquet"))
            if not files:
                raise DataError(meta / "episodes", None, "episode metadata parquet files", "none")
            self.episodes = [row for f in files for row in pq.read_table(f).drop_columns(
                [c for c in pq.read_schema(f).names if c.startswith("stats/")]).to_pylist()]
        else:
            self.tasks = [t["task"] for t in sorted(self._jsonl(meta / "tasks.jsonl"), key=lambda t: t["task_index"])]
            self.episodes = sorted(self._jsonl(meta / "episodes.jsonl"), key=lambda e: e["episode_index"])
        indices = [e["episode_index"] for e in self.episodes]
        where = meta / ("episodes" if self.version == "v3.0" else "episodes.jsonl")
        if len(set(indices)) != len(indices):
            dup = next(i for i in indices if indices.count(i) > 1)
            raise DataError(where, "episode_index", "each episode index once", f"episode {dup} {indices.count(dup)} times")
        if indices != list(range(len(indices))):
            raise DataError(where, "episode_index", f"episodes 0..{len(indices) - 1}", f"{indices[:10]}...")
        self.fps = float(fps or self.info["fps"])
        self.n_episodes = len(self.episodes)
        stored = self.info.get("protege", {})  # our own attrs, when the dataset was exported by protege
        self.kinds = {to_buffer_key(k): "image" for k in [*self.video_keys, *self.image_keys]}
        self.kinds.update({"action": "action", "task": "language"})
        self.kinds.update(stored.get("kinds", {}))
        self.attrs = {k: v for k, v in stored.items() if k not in ("kinds", "provenance", "fps")}
        self.attrs.update({
            "provenance": {"source": str(path.resolve()), "adapter": "lerobot", "codebase_version": self.version,
                           "robot_type": self.info.get("robot_type"), **({"origin": stored["provenance"]} if "provenance" in stored else {})},
            "tasks": self.tasks,
        })

    @staticmethod
    def _jsonl(file: Path) -> list[dict]:
        if not file.exists():
            raise DataError(file, None, "a LeRobot v2.1 metadata file", "missing")
        rows = []
        for n, line in enumerate(file.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(file, f"line {n + 1}", "a JSON object", f"invalid JSON ({e})") from e
        return rows

    @staticmethod
    def _read_tasks_v3(file: Path) -> list[str]:
        import pyarrow.parquet as pq

        t = pq.read_table(file)
        name = next((c for c in ("task", "__index_level_0__") if c in t.column_names), None)
        if name is None or "task_index" not in t.column_names:
            raise DataError(file, "task", "columns task_index and task (the pandas index)", f"columns {t.column_names}")
        order = np.argsort(_column(t, "task_index"))
        return [str(t.column(name)[int(i)]) for i in order]

    def _data_file(self, i: int) -> Path:
        ep, tmpl = self.episodes[i], self.info["data_path"]
        if self.version == "v3.0":
            return self.path / tmpl.format(chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"])
        return self.path / tmpl.format(episode_chunk=i // self.info.get("chunks_size", 1000), episode_index=i)

    def _video_file(self, i: int, key: str) -> tuple[Path, float]:
        ep, tmpl = self.episodes[i], self.info.get("video_path") or ""
        if self.version == "v3.0":
            file = tmpl.format(video_key=key, chunk_index=ep[f"videos/{key}/chunk_index"], file_index=ep[f"videos/{key}/file_index"])
            return self.path / file, float(ep[f"videos/{key}/from_timestamp"])
        return self.path / tmpl.format(episode_chunk=i // self.info.get("chunks_size", 1000), video_key=key, episode_index=i), 0.0

    def read_episode(self, i: int) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        file = self._data_file(i)
        if not file.exists():
            raise DataError(file, None, f"the data parquet of episode {i}", "missing")
        try:
            table = pq.read_table(file, filters=[("episode_index", "=", i)])
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for damaged files
            raise DataError(file, None, "a readable parquet file", f"unreadable ({e})") from e
        length = int(self.episodes[i]["length"])
        if table.num_rows != length:
            raise DataError(file, "episode_index", f"{length} rows of episode {i} (as in meta episodes)", f"{table.num_rows}")
        ts = _column(table, "timestamp").astype(np.float64)
        if len(ts) > 1 and not (np.diff(ts) > 0).all():
            k = int(np.argmax(np.diff(ts) <= 0)) + 1
            raise DataError(file, "timestamp", "strictly increasing timestamps within an episode", f"{ts[k]} after {ts[k - 1]} at frame {k}")
        missing = [k for k in [*self.value_keys, *self.image_keys] if k not in table.column_names]
        if missing:
            raise DataError(file, missing[0], "a column for every non-video feature in info.json", f"columns {table.column_names}")
        sources: dict[str, str] = {}
        arrays: dict[str, np.ndarray] = {}
        for name in self.value_keys:
            key = to_buffer_key(name)
            arr = _column(table, name)
            want = self.info["features"][name]
            arrays[key] = arr.astype(want["dtype"]) if want["dtype"] != "bool" else arr.astype(bool)
            if list(want["shape"]) == [1] and arr.ndim == 2:
                arrays[key] = arrays[key][:, 0]
            sources[key] = name
        if "task_index" in table.column_names:
            arrays["task"], sources["task"] = _column(table, "task_index").astype(np.int64), "task_index"
        for name in self.image_keys:
            key, sources[to_buffer_key(name)] = to_buffer_key(name), name
            arrays[key] = self._decode_pngs(file, name, table.column(name).to_pylist())
        for name in self.video_keys:
            video, start = self._video_file(i, name)
            key, sources[key] = to_buffer_key(name), name
            arrays[key] = self._decode_video(video, name, start + ts)
            check_images(video, name, arrays[key], None)
        check_episode_arrays(file, arrays, sources)  # errors name the source file and key
        return arrays

    @staticmethod
    def _decode_pngs(file: Path, name: str, cells: list[dict]) -> np.ndarray:
        import io

        from PIL import Image

        try:
            return np.stack([np.asarray(Image.open(io.BytesIO(c["bytes"])).convert("RGB")) for c in cells])
        except Exception as e:  # noqa: BLE001
            raise DataError(file, name, "PNG-encoded images of one size", f"undecodable or ragged images ({e})") from e

    def _decode_video(self, file: Path, name: str, times: np.ndarray) -> np.ndarray:
        import av

        if not file.exists():
            raise DataError(file, name, "the episode's video file", "missing")
        frames: list[np.ndarray] = []
        try:
            with av.open(str(file)) as container:
                stream = container.streams.video[0]
                container.seek(max(0, int((times[0] - 1.0) / stream.time_base)), stream=stream, backward=True, any_frame=False)
                k = 0
                for frame in container.decode(stream):
                    t = float(frame.pts * stream.time_base)
                    if t < times[k] - self.tolerance_s:
                        continue
                    if abs(t - times[k]) > self.tolerance_s:
                        break
                    frames.append(frame.to_ndarray(format="rgb24"))
                    k += 1
                    if k == len(times):
                        break
        except (av.FFmpegError, IndexError) as e:
            raise DataError(file, name, "a decodable mp4 video stream", f"{type(e).__name__}: {e}") from e
        if len(frames) != len(times):
            raise DataError(file, name, f"{len(times)} frames at {times[0]:.3f}..{times[-1]:.3f} s (tolerance {self.tolerance_s} s)",
                            f"{len(frames)} matching frames")
        return np.stack(frames)

    def close(self) -> None:
        pass


def export(buffer: ReplayBuffer, out: str | Path, robot_type: str | None = None, vcodec: str = "libsvtav1",
           progress: bool = True) -> Path:
    """Write a replay buffer as a LeRobot v3.0 dataset folder (built in a temp dir, then renamed)."""
    import av
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists():
        raise DataError(out, None, "a new output folder", "an existing path")
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per stream otherwise (1 = errors only)
    fps = buffer.fps
    if fps <= 0 or abs(fps - round(fps)) > 1e-9:
        raise DataError(buffer.path, "attrs/fps", "an integer frame rate (LeRobot stores int fps)", str(fps))
    fps = int(round(fps))
    kinds = buffer.kinds
    features: dict[str, dict] = {}
    for key in buffer.keys():
        arr, name = buffer.data[key], to_lerobot_key(key, kinds.get(key, "state"))
        if kinds.get(key) == "image":
            h, w, c = arr.shape[1:]
            if h % 2 or w % 2:
                raise DataError(buffer.path, key, "even image height and width (yuv420p video)", f"{h}x{w}")
            features[name] = {"dtype": "video", "shape": [h, w, c], "names": ["height", "width", "channels"],
                              "info": {"video.height": h, "video.width": w, "video.codec": "av1" if "av1" in vcodec else vcodec,
                                       "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                                       "video.channels": c, "has_audio": False}}
        elif key != "task":
            if "/" in name:
                raise DataError(buffer.path, key, "LeRobot feature names without '/' (obs/<x> or a plain name)", repr(name))
            if arr.ndim > 2:
                raise DataError(buffer.path, key, "vectors (T, D) or images for LeRobot export", f"shape {arr.shape}")
            features[name] = {"dtype": str(arr.dtype), "shape": [arr.shape[1]] if arr.ndim == 2 else [1], "names": None}
    for name, dtype in zip(META_COLUMNS, ("float32", "int64", "int64", "int64", "int64")):
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    tasks = list(buffer.attrs.get("tasks") or ["unspecified task"])
    if "task" in buffer.keys():
        top = int(np.asarray(buffer.data["task"][: buffer.n_steps]).max(initial=0))
        if top >= len(tasks):
            raise DataError(buffer.path, "task", f"indices into attrs['tasks'] ({len(tasks)} strings)", f"index {top}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        (tmp / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
        (tmp / "data" / "chunk-000").mkdir(parents=True)
        video_keys = [k for k in buffer.keys() if kinds.get(k) == "image"]
        writers = {}
        for key in video_keys:
            name = to_lerobot_key(key, "image")
            (tmp / "videos" / name / "chunk-000").mkdir(parents=True)
            container = av.open(str(tmp / "videos" / name / "chunk-000" / "file-000.mp4"), "w")
            stream = container.add_stream(vcodec, rate=fps, options={"g": "2", "crf": "30"} if "svtav1" in vcodec else {})
            stream.pix_fmt, (stream.height, stream.width) = "yuv420p", buffer.data[key].shape[1:3]
            writers[key] = (container, stream)
        parquet = None
        episodes, frame = [], 0
        for i in tqdm(range(buffer.n_episodes), desc=f"export {out.name}", unit="ep", disable=not progress):
            ep = buffer.get_episode(i)
            n = len(ep["action"])
            cols: dict[str, Any] = {}
            for key, arr in ep.items():
                if key in video_keys or key == "task":
                    continue
                name = to_lerobot_key(key, kinds.get(key, "state"))
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1]) if arr.ndim == 2 else pa.array(arr)
            cols.update(timestamp=pa.array((np.arange(n) / fps).astype(np.float32)), frame_index=pa.array(np.arange(n)),
                        episode_index=pa.array(np.full(n, i)), index=pa.array(np.arange(frame, frame + n)),
                        task_index=pa.array(ep["task"].astype(np.int64) if "task" in ep else np.zeros(n, np.int64)))
            table = pa.table(cols)
            if parquet is None:
                parquet = pq.ParquetWriter(tmp / "data" / "chunk-000" / "file-000.parquet", table.schema, compression="snappy")
            parquet.write_table(table)
            row = {"episode_index": i, "tasks": sorted({tasks[t] for t in np.unique(cols["task_index"].to_numpy())}),
                   "length": n, "data/chunk_index": 0, "data/file_index": 0,
                   "dataset_from_index": frame, "dataset_to_index": frame + n}
            for key in video_keys:
                container, stream = writers[key]
                for t, img in enumerate(ep[key]):
                    vf = av.VideoFrame.from_ndarray(img, format="rgb24")
                    vf.pts = frame + t  # time base 1/fps: frame k of the file at k/fps seconds
                    for packet in stream.encode(vf):
                        container.mux(packet)
                name = to_lerobot_key(key, "image")
                row.update({f"videos/{name}/chunk_index": 0, f"videos/{name}/file_index": 0,
                            f"videos/{name}/from_timestamp": frame / fps, f"videos/{name}/to_timestamp": (frame + n) / fps})
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            episodes.append(row)
            frame += n
        if parquet is not None:
            parquet.close()
        for container, stream in writers.values():
            for packet in stream.encode():
                container.mux(packet)
            container.close()
        pq.write_table(pa.Table.from_pylist(episodes), tmp / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
        pd.DataFrame({"task_index": np.arange(len(tasks))}, index=pd.Index(tasks, name="task")).to_parquet(tmp / "meta" / "tasks.parquet")
        (tmp / "meta" / "stats.json").write_text(json.dumps(_stats(buffer, kinds), indent=4))
        info = {
            "codebase_version": "v3.0", "robot_type": robot_type, "total_episodes": buffer.n_episodes,
            "total_frames": buffer.n_steps, "total_tasks": len(tasks), "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 500, "fps": fps,
            "splits": {"train": f"0:{buffer.n_episodes}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if video_keys else None,
            "features": features,
            # everything else we know, so that ours -> LeRobot -> ours loses no metadata
            "protege": {k: v for k, v in buffer.attrs.items() if k not in ("protege_format", "collect")},
        }
        (tmp / "meta" / "info.json").write_text(json.dumps(info, indent=4, default=str))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _stats(buffer: ReplayBuffer, kinds: dict[str, str]) -> dict[str, dict[str, list]]:
    """meta/stats.json: min/max/mean/std/count per feature; images per channel in [0, 1], shape (3, 1, 1)."""
    stats = {}
    for key in buffer.keys():
        arr = np.asarray(buffer.data[key][: buffer.n_steps])
        if kinds.get(key) == "image":
            x = arr[:: max(1, len(arr) // 100)].astype(np.float64) / 255.0  # ~100 sampled frames, as lerobot does
            axes, shape = (0, 1, 2), (-1, 1, 1)
        else:
            x, axes, shape = arr.astype(np.float64).reshape(len(arr), -1), 0, (-1,)
        stats[to_lerobot_key(key, kinds.get(key, "state"))] = {
            "min": x.min(axes).reshape(shape).tolist(), "max": x.max(axes).reshape(shape).tolist(),
            "mean": x.mean(axes).reshape(shape).tolist(), "std": x.std(axes).reshape(shape).tolist(), "count": [len(x)]}
    return stats
