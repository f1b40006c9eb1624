"""The inference backends, in one table: what each runs and how.

A backend pairs an engine (load, warm up, infer, close) with the pipeline that runs frames
through it. It names the engine kinds it runs (a bundle manifest's ``engine.kind``: ``onnx``,
``tensorrt``; a bare model file is ``onnx``); ``engine.backend: auto`` takes the first backend in
the table that runs the kind at hand, so the order says which is preferred.

Adding a backend is one module (its engine, and its pipeline unless the host pipeline serves:
any engine that hands raw outputs back to the host) plus one entry in :data:`BACKENDS`. Tests and
tools may run with another table (the daemon takes one), without touching this one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cellseg.edge.engines.base import Engine
from cellseg.edge.errors import ConfigError, ModelError
from cellseg.edge.pipeline.contract import Pipeline
from cellseg.edge.pipeline.host import HostPipeline
from cellseg.edge.pipeline.model_info import ModelInfo, PostprocessConfig

AUTO = "auto"
_HOLDS = {"onnx": "is an ONNX model", "tensorrt": "holds a TensorRT engine"}


@dataclass(frozen=True)
class EngineFile:
    """What a backend opens: the file, and what a bundle's manifest says of it (a TensorRT plan
    carries no metadata of its own; an ONNX model does, and needs none of this)."""

    path: Path
    info: ModelInfo | None = None
    precision: str | None = None
    threads: int | None = None
    compute: str = "fp32"  # the float precision asked for (engine.precision), where a backend has a choice


@dataclass(frozen=True)
class PipelineSettings:
    """How the device runs frames: postprocess thresholds, pixel size, where compiled kernels live."""

    thresholds: PostprocessConfig
    pixel_size_um: float | None = None
    kernel_cache: Path | None = None


@dataclass(frozen=True)
class Backend:
    """One inference backend.

    Attributes:
        name: what ``engine.backend`` and ``--backend`` call it.
        kinds: the engine kinds it runs.
        engine: makes the (not yet loaded) engine for a file.
        pipeline: the pipeline around a loaded engine.
    """

    name: str
    kinds: tuple[str, ...]
    engine: Callable[[EngineFile], Engine]
    pipeline: Callable[[Engine, PipelineSettings], Pipeline]


def _onnxruntime_engine(file: EngineFile) -> Engine:
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine

    if file.compute != "fp32":
        raise ConfigError(f"ONNX Runtime computes in fp32 (INT8 from a Q/DQ model), not {file.compute}; "
                          "engine.backend: openvino offers bf16")  # fmt: skip
    return OnnxRuntimeEngine(file.path, threads=file.threads)


def _openvino_engine(file: EngineFile) -> Engine:
    from cellseg.edge.engines.openvino_engine import OpenVinoEngine

    return OpenVinoEngine(file.path, precision=file.compute, threads=file.threads)


def host_pipeline(engine: Engine, settings: PipelineSettings) -> Pipeline:
    return HostPipeline(engine, settings.thresholds, settings.pixel_size_um)


def _tensorrt_engine(file: EngineFile) -> Engine:
    from cellseg.edge.engines.tensorrt_engine import TensorRTEngine

    if file.info is None:
        raise ModelError(f"{file.path}: a TensorRT plan runs only from a bundle, whose manifest describes its model")
    return TensorRTEngine(file.path, file.info, precision=file.precision or "fp16")


def _cuda_pipeline(engine: Engine, settings: PipelineSettings) -> Pipeline:
    from cellseg.edge.engines.cuda_pipeline import CudaPipeline
    from cellseg.edge.engines.tensorrt_engine import TensorRTEngine

    if not isinstance(engine, TensorRTEngine):
        raise ModelError(f"the CUDA pipeline runs TensorRT engines, not {type(engine).__name__}")
    return CudaPipeline(engine, settings.thresholds, settings.pixel_size_um, kernel_cache=settings.kernel_cache)


BACKENDS: Mapping[str, Backend] = MappingProxyType({
    b.name: b
    for b in (
        Backend("onnxruntime", ("onnx",), _onnxruntime_engine, host_pipeline),
        Backend("tensorrt", ("tensorrt",), _tensorrt_engine, _cuda_pipeline),
        Backend("openvino", ("onnx",), _openvino_engine, host_pipeline),
    )
})  # fmt: skip


def choose_backend(kind: str, requested: str, where: object, backends: Mapping[str, Backend] = BACKENDS) -> Backend:
    """The backend that runs an engine of ``kind`` at ``where``: the requested one, which must
    run that kind, or for ``auto`` the first in the table that does; ConfigError naming both."""
    if requested == AUTO:
        for backend in backends.values():
            if kind in backend.kinds:
                return backend
        raise ConfigError(f"{where}: no backend runs {kind} engines (known: {', '.join(backends)})")
    if requested not in backends:
        raise ConfigError(f"engine.backend {requested!r} is not a backend (known: {AUTO}, {', '.join(backends)})")
    backend = backends[requested]
    if kind not in backend.kinds:
        held = _HOLDS.get(kind, f"holds a {kind} engine")
        raise ConfigError(f"engine.backend is {requested!r} but {where} {held} ({requested} runs "
                          f"{' and '.join(backend.kinds)} engines)")  # fmt: skip
    return backend
