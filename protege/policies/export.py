"""A policy's sampling function compiled by an inference runtime, cached next to the checkpoint.

Why: at batch 1 on a CPU, Diffusion Policy's DDIM loop is hundreds of small ops (≈33 conv1d per
denoising step) and eager PyTorch spends most of its time dispatching them. A maintained runtime
runs the whole unrolled loop as one graph instead (no hand-written kernels here):

- `onnx`: ONNX Runtime on a graph written by `torch.onnx.export` (TorchScript exporter: it traces the
  unrolled loop in seconds, where the dynamo exporter took minutes, and keeps the batch dynamic);
- `aoti`: `torch.export` + AOTInductor, a compiled shared library in a `.pt2` package;
- `eager`: no export.

`auto` is `onnx` (measured faster here, see `scripts/bench_inference.py --runtimes`). An artefact is
named by a key over the exported weights, the caller's settings (scheduler, steps, shapes) and the
exporter/runtime versions, so a retrained checkpoint, other settings or an upgraded runtime build a
new one, and stale ones are removed. Any failure (runtime not installed, export error, read-only
checkpoint directory) logs one line and leaves the policy on eager PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("protege.export")

EXPORT_VERSION = 1  # bump when what gets exported changes: every cached artefact is rebuilt
RUNTIMES = ("auto", "onnx", "aoti", "eager")
_SUFFIX = {"onnx": "onnx", "aoti": "pt2"}


def runtime_versions(runtime: str) -> dict[str, str]:
    """Versions that make an artefact stale; raises ImportError when the runtime is missing."""
    versions = {"protege_export": str(EXPORT_VERSION), "torch": torch.__version__}
    if runtime == "onnx":
        import onnx
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return versions


def artefact_key(module: nn.Module, settings: Mapping[str, Any], versions: Mapping[str, str]) -> str:
    """Content hash of the module's weights and buffers + settings + versions (not file mtimes: a
    checkpoint copied elsewhere keeps its artefact, a retrained one in place does not)."""
    h = hashlib.sha256(json.dumps({"settings": settings, "versions": versions}, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ExportedFunction:
    """Calls an exported artefact like the function it was traced from: tensors in (batch first),
    one tensor out. Picklable: the runtime session is opened lazily in the process that calls it
    (the runner's inference process), with that process's torch thread count."""

    def __init__(self, path: Path, runtime: str, input_names: Sequence[str]) -> None:
        self.path, self.runtime, self.input_names = Path(path), runtime, list(input_names)
        self._session: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}

    def _open(self) -> Any:
        if self.runtime == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()  # the caller's budget (the runner sets 1)
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        return torch._inductor.aoti_load_package(str(self.path))

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self._session is None:
            self._session = self._open()
        if self.runtime == "onnx":
            feed = {n: a.detach().float().cpu().numpy() for n, a in zip(self.input_names, args)}
            return torch.from_numpy(self._session.run(None, feed)[0])
        return self._session(*(a.float().contiguous() for a in args))


def export_function(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    cache_dir: str | Path,
    name: str,
    runtime: str = "auto",
    settings: Mapping[str, Any] | None = None,
) -> ExportedFunction | None:
    """Export `module.forward(*inputs) -> tensor` (dim 0 of every input and of the output is the
    batch, kept dynamic) to `cache_dir/<name>-<key>.<onnx|pt2>`, reusing a cached artefact with the
    same key. Returns None (after logging why) when the policy must stay on eager PyTorch."""
    if runtime not in RUNTIMES:
        raise ValueError(f"inference runtime {runtime!r}: expected one of {RUNTIMES}")
    runtime = "onnx" if runtime == "auto" else runtime
    if runtime == "eager":
        return None
    try:
        versions = runtime_versions(runtime)
    except ImportError as e:
        log.warning("%s: inference runtime %r is not installed (%s); running eager PyTorch", name, runtime, e)
        return None
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{name}-{runtime}-{artefact_key(module, settings or {}, versions)}.{_SUFFIX[runtime]}"
    if path.exists():
        log.info("%s: using the cached %s artefact %s", name, runtime, path)
        return ExportedFunction(path, runtime, input_names)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".export-") as tmp:
            tmp_path = Path(tmp) / path.name
            _BUILDERS[runtime](module, tuple(example_inputs), list(input_names), tmp_path)
            os.replace(tmp_path, path)  # atomic: a reader sees the whole artefact or none
    except Exception as e:  # noqa: BLE001 - exporting is an optimisation: never fatal
        log.warning("%s: exporting for %s failed (%s: %s); running eager PyTorch", name, runtime, type(e).__name__, e)
        return None
    for old in cache_dir.glob(f"{name}-{runtime}-*.{_SUFFIX[runtime]}"):
        if old != path:  # stale: other weights, settings or versions
            old.unlink(missing_ok=True)
    log.info("%s: exported for %s to %s", name, runtime, path)
    return ExportedFunction(path, runtime, input_names)


def _build_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], path: Path) -> None:
    axes = {n: {0: "batch"} for n in [*names, "output"]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on constants (the fixed timesteps) and the exporter's deprecation
        torch.onnx.export(module, inputs, str(path), dynamo=False, input_names=names, output_names=["output"],
                          dynamic_axes=axes, opset_version=18)


def _build_aoti(module: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], path: Path) -> None:
    # batch >= 2 in the example: torch.export specialises a dimension traced at size 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        ep = torch.export.export(module, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs), strict=False)
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path))


_BUILDERS = {"onnx": _build_onnx, "aoti": _build_aoti}
