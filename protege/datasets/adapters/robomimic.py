"""robomimic hdf5 <-> replay buffer.

robomimic layout (as written by robomimic's dataset scripts)::

    data/                 attrs: total (int), env_args (JSON string: env_name, type, env_kwargs)
      demo_<N>/           attrs: num_samples
        actions           (T, A)
        obs/<key>         (T, ...)   low-dim or uint8 HWC images (e.g. agentview_image)
        next_obs/<key>    (T, ...)   (not imported: it is obs shifted by one)
        rewards (T,)  dones (T,)  states (T, S)   (optional)
    mask/<filter>         array of demo names (bytes), e.g. train / valid

Import keeps robomimic's demo order (sorted by N), maps `obs/<key>` -> `obs/<key>`, `actions` ->
`action`, `rewards`/`dones`/`states` -> `reward`/`done`/`sim_state`, and carries `env_args` and the
filter keys (as episode indices) into the buffer attrs (`attrs.robomimic`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from protege.datasets.adapters._common import check_images, h5_array, open_h5
from protege.datasets.replay_buffer import ReplayBuffer, check_episode_arrays
from protege.errors import DataError

_DEMO = re.compile(r"^demo_(\d+)$")
_EXTRAS = {"rewards": "reward", "dones": "done", "states": "sim_state"}


def detect(path: Path) -> bool:
    if not (path.is_file() and path.suffix in (".hdf5", ".h5")):
        return False
    with open_h5(path) as f:
        return "data" in f and any(_DEMO.match(k) for k in f["data"])


class Reader:
    def __init__(self, path: Path, fps: float | None = None) -> None:
        self.path = path
        self.f = open_h5(path)
        if "data" not in self.f:
            raise DataError(path, "data", "a group 'data' holding demo_<N> groups (robomimic layout)", f"top-level keys {sorted(self.f)}")
        data = self.f["data"]
        bad = [k for k in data if not _DEMO.match(k)]
        if bad:
            raise DataError(path, f"data/{bad[0]}", "only demo_<N> groups under data/", repr(bad[0]))
        self.demos = sorted(data, key=lambda k: int(_DEMO.match(k).group(1)))
        try:
            env_args = json.loads(data.attrs.get("env_args", "{}"))
        except json.JSONDecodeError as e:
            raise DataError(path, "data.attrs/env_args", "a JSON string", f"invalid JSON ({e})") from e
        masks = {}
        if "mask" in self.f:
            index = {d: i for i, d in enumerate(self.demos)}
            for name in self.f["mask"]:
                demos = [d.decode() if isinstance(d, bytes) else str(d) for d in h5_array(self.f, f"mask/{name}", path)]
                missing = [d for d in demos if d not in index]
                if missing:
                    raise DataError(path, f"mask/{name}", "names of existing demos", repr(missing[0]))
                masks[name] = [index[d] for d in demos]
        control_freq = env_args.get("env_kwargs", {}).get("control_freq")
        self.fps = float(fps or control_freq or 20)
        self.n_episodes = len(self.demos)
        self.attrs = {
            "provenance": {"source": str(path.resolve()), "adapter": "robomimic", "demos": self.demos},
            "robomimic": {"env_args": env_args, "mask": masks, "total": int(data.attrs.get("total", -1))},
        }
        self.kinds = {"reward": "state", "done": "state", "sim_state": "state"}
        self._image_shapes: dict[str, tuple[int, ...]] = {}

    def read_episode(self, i: int) -> dict[str, np.ndarray]:
        demo = f"data/{self.demos[i]}"
        g = self.f[demo]
        if "obs" not in g:
            raise DataError(self.path, f"{demo}/obs", "a group of observation datasets", "missing")
        sources = {"action": f"{demo}/actions"}
        sources.update({f"obs/{k}": f"{demo}/obs/{k}" for k in sorted(g["obs"])})
        sources.update({dst: f"{demo}/{src}" for src, dst in _EXTRAS.items() if src in g})
        arrays = {key: h5_array(self.f, src, self.path) for key, src in sources.items()}
        for key, arr in arrays.items():
            if key.startswith("obs/") and arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):
                check_images(self.path, sources[key], arr, self._image_shapes.get(key))
                self._image_shapes[key] = arr.shape[1:]
        check_episode_arrays(self.path, arrays, sources)  # errors name the source file and key
        return arrays

    def close(self) -> None:
        self.f.close()


def export(buffer: ReplayBuffer, out: str | Path, progress: bool = True) -> Path:
    """Write a replay buffer as a robomimic hdf5 file (atomically: temp file, then rename)."""
    import h5py
    from tqdm.auto import tqdm

    out = Path(out)
    meta = buffer.attrs.get("robomimic", {})
    tmp = out.with_name(f".{out.name}.tmp")
    with h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(meta.get("env_args", {"env_name": "", "type": -1, "env_kwargs": {}}))
        data.attrs["total"] = buffer.n_steps
        obs_keys = [k for k in buffer.keys() if k.startswith("obs/")]
        for i in tqdm(range(buffer.n_episodes), desc=f"export {out.name}", unit="ep", disable=not progress):
            ep = buffer.get_episode(i)
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = len(ep["action"])
            g.create_dataset("actions", data=ep["action"])
            for k in obs_keys:
                name = k.removeprefix("obs/")
                nxt = np.concatenate([ep[k][1:], ep[k][-1:]])  # robomimic's next_obs: obs shifted by one
                opts = {"compression": "gzip", "compression_opts": 4} if ep[k].dtype == np.uint8 else {}
                g.create_dataset(f"obs/{name}", data=ep[k], **opts)
                g.create_dataset(f"next_obs/{name}", data=nxt, **opts)
            dones = np.zeros(len(ep["action"]), np.int64)
            dones[-1] = 1
            g.create_dataset("rewards", data=ep.get("reward", np.zeros(len(ep["action"]))))
            g.create_dataset("dones", data=ep.get("done", dones))
            if "sim_state" in ep:
                g.create_dataset("states", data=ep["sim_state"])
        for name, idx in meta.get("mask", {}).items():
            f.create_dataset(f"mask/{name}", data=np.array([f"demo_{i}".encode() for i in idx], dtype="S"))
    os.replace(tmp, out)
    return out
