"""Which engine to run: a model path (an ONNX file or an installed bundle slot) -> a loaded engine.

A slot's files are checked against its manifest each time it is opened (a slot corrupted on
disk is refused, not run). The TensorRT backend is imported only for a TensorRT bundle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cellseg.edge.bundle import MANIFEST, BundleError, Manifest, check_files, parse_manifest
from cellseg.edge.engine import Engine
from cellseg.edge.engine_onnxruntime import OnnxRuntimeEngine
from cellseg.edge.errors import CellsegError, ConfigError, ModelError
from cellseg.edge.model_info import CELLSEG_METADATA_KEY, ModelInfo
from cellseg.edge.predictor import Predictor
from cellseg.edge.slots import SlotStore

if TYPE_CHECKING:
    from cellseg.edge.config import Config
    from cellseg.edge.gpu_predictor import GpuPredictor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenedEngine:
    engine: Engine
    backend: str  # "onnxruntime" or "tensorrt"
    path: Path
    manifest: Manifest | None  # None for a bare ONNX file

    def describe(self) -> str:
        where = f"slot {self.path.name}" if self.manifest is not None else str(self.path)
        return f"{self.backend} ({self.engine.precision}) from {where}, engine id {self.engine.engine_id}"


def read_slot_manifest(slot: Path) -> Manifest:
    try:
        data = (slot / MANIFEST).read_bytes()
    except OSError as e:
        raise ModelError(f"{slot}: no readable {MANIFEST}: {e.strerror}") from e
    return parse_manifest(data)


def slot_model_info(manifest: Manifest, slot: Path) -> ModelInfo:
    """The model a slot's engine was made from, from its manifest (a TensorRT plan carries none)."""
    return ModelInfo.from_metadata({CELLSEG_METADATA_KEY: json.dumps(manifest.model)}, slot)


def check_backend(kind: str, backend: str, where: object) -> str:
    """The backend that runs an engine of ``kind`` (``onnx``/``tensorrt``); ConfigError when the
    config's ``engine.backend`` asks for the other one."""
    if kind == "onnx":
        if backend == "tensorrt":
            raise ConfigError(f"engine.backend is 'tensorrt' but {where} is an ONNX model; build a TensorRT bundle")
        return "onnxruntime"
    if backend == "onnxruntime":
        raise ConfigError(f"engine.backend is 'onnxruntime' but {where} holds a TensorRT engine")
    return "tensorrt"


def open_engine(path: Path, backend: str = "auto", threads: int | None = None) -> OpenedEngine:
    """Load the engine at ``path`` and warm it up.

    Args:
        path: an ``.onnx`` file, or a folder holding an installed bundle (``manifest.json``).
        backend: ``auto``, ``onnxruntime`` or ``tensorrt`` (the config's ``engine.backend``).
        threads: ONNX Runtime intra-op threads.
    """
    manifest = None
    if path.is_dir():
        manifest = read_slot_manifest(path)
        try:
            check_files(path, manifest)
        except BundleError as e:
            raise ModelError(f"installed engine is damaged: {e}") from e
        kind = manifest.engine.kind
        model_file = path / manifest.engine.file
    elif path.suffix.lower() == ".onnx" or path.is_file():
        kind, model_file = "onnx", path
    else:
        raise ModelError(f"{path}: no such model file or engine slot")
    name = check_backend(kind, backend, path)
    if name == "onnxruntime":
        engine: Engine = OnnxRuntimeEngine(model_file, threads=threads)
    else:
        assert manifest is not None
        from cellseg.edge.engine_tensorrt import TensorRTEngine

        engine = TensorRTEngine(model_file, slot_model_info(manifest, path), precision=manifest.engine.precision)
    engine.load()
    try:
        engine.warmup()
    except Exception:
        engine.close()
        raise
    return OpenedEngine(engine, name, path, manifest)


def configured_candidates(store: SlotStore, model: Path) -> list[tuple[str | None, Path]]:
    """Where a device's engine comes from, in order: the active flashed slot (with the name the
    ``active`` link points to), the previous slot, the configured model."""
    candidates: list[tuple[str | None, Path | None]] = [
        (store.active_target(), store.active()),
        (None, store.previous()),
        (None, model),
    ]
    return [(target, path) for target, path in candidates if path is not None]


def open_first(
    candidates: Sequence[tuple[str | None, Path]], backend: str = "auto", threads: int | None = None
) -> tuple[OpenedEngine, str | None, list[str]]:
    """The first candidate that loads, its slot name, and why the ones before it did not."""
    errors: list[str] = []
    for target, path in candidates:
        try:
            return open_engine(path, backend, threads), target, errors
        except CellsegError as e:
            reason = str(e) if str(path) in str(e) else f"{path}: {e}"  # most errors name the path already
            errors.append(reason)
            logger.error("cannot run engine: %s", reason)
    raise ConfigError("no engine can be loaded: " + "; ".join(errors))


def predictor_for(opened: OpenedEngine, config: Config | None = None) -> Predictor | GpuPredictor:
    """The pipeline around an opened engine: pre- and post-processing in CUDA kernels for a
    TensorRT engine (masks come back only when asked for), numpy/OpenCV for ONNX Runtime.

    ``config``: the device configuration, whose postprocess overrides and pixel size apply
    (the model's own thresholds when ``None``).
    """
    thresholds, pixel_size_um = opened.engine.info.thresholds, None
    if config is not None:
        p = config.postprocess
        thresholds = thresholds.overridden(conf=p.conf, iou=p.iou, max_det=p.max_det)
        pixel_size_um = config.measurement.pixel_size_um
    if opened.backend == "tensorrt":
        from cellseg.edge.engine_tensorrt import TensorRTEngine
        from cellseg.edge.gpu_predictor import GpuPredictor

        assert isinstance(opened.engine, TensorRTEngine)
        kernel_cache = config.state_dir / "kernels" if config is not None else None
        return GpuPredictor(opened.engine, thresholds, pixel_size_um, kernel_cache=kernel_cache)
    return Predictor(opened.engine, thresholds, pixel_size_um)
