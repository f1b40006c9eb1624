"""Which engine to run: a model path (an ONNX file or an installed bundle slot) -> a loaded engine.

A slot's files are checked against its manifest each time it is opened (a slot corrupted on
disk is refused, not run). Which backend runs it comes from the backend table
(:mod:`cellseg.edge.engines.registry`); the TensorRT backend is imported only for a TensorRT bundle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cellseg.edge.bundles.reader import MANIFEST, Manifest, check_files, parse_manifest
from cellseg.edge.bundles.slots import SlotStore
from cellseg.edge.engines.base import Engine
from cellseg.edge.engines.registry import AUTO, BACKENDS, Backend, EngineFile, PipelineSettings, choose_backend
from cellseg.edge.errors import BundleError, CellsegError, ConfigError, ModelError
from cellseg.edge.pipeline.contract import Pipeline
from cellseg.edge.pipeline.model_info import CELLSEG_METADATA_KEY, ModelInfo
from cellseg.edge.pipeline.tiling import TileSettings, with_tiling

if TYPE_CHECKING:
    from cellseg.edge.config import Config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenedEngine:
    engine: Engine
    backend: Backend
    path: Path
    manifest: Manifest | None  # None for a bare ONNX file

    def describe(self) -> str:
        where = f"slot {self.path.name}" if self.manifest is not None else str(self.path)
        return f"{self.backend.name} ({self.engine.precision}) from {where}, engine id {self.engine.engine_id}"


def read_slot_manifest(slot: Path) -> Manifest:
    try:
        data = (slot / MANIFEST).read_bytes()
    except OSError as e:
        raise ModelError(f"{slot}: no readable {MANIFEST}: {e.strerror}") from e
    return parse_manifest(data)


def slot_model_info(manifest: Manifest, slot: Path) -> ModelInfo:
    """The model a slot's engine was made from, from its manifest (a TensorRT plan carries none)."""
    return ModelInfo.from_metadata({CELLSEG_METADATA_KEY: json.dumps(manifest.model)}, slot)


def engine_kind(path: Path) -> tuple[str, Path, Manifest | None]:
    """(the engine kind, the engine file, the manifest) of a model file or installed slot; a
    slot's files are checked against its manifest first."""
    if path.is_dir():
        manifest = read_slot_manifest(path)
        try:
            check_files(path, manifest)
        except BundleError as e:
            raise ModelError(f"installed engine is damaged: {e}") from e
        return manifest.engine.kind, path / manifest.engine.file, manifest
    if path.suffix.lower() == ".onnx" or path.is_file():
        return "onnx", path, None
    raise ModelError(f"{path}: no such model file or engine slot")


def open_engine(
    path: Path,
    backend: str = AUTO,
    threads: int | None = None,
    backends: Mapping[str, Backend] = BACKENDS,
    *,
    compute: str = "fp32",
) -> OpenedEngine:
    """Load the engine at ``path`` and warm it up.

    Args:
        path: an ``.onnx`` file, or a folder holding an installed bundle (``manifest.json``).
        backend: ``auto`` or a backend's name (the config's ``engine.backend``).
        threads: intra-op threads for CPU backends.
        backends: the backend table (default: every built-in backend).
        compute: the float precision (``engine.precision``) where the backend has a choice.
    """
    kind, model_file, manifest = engine_kind(path)
    chosen = choose_backend(kind, backend, path, backends)
    if manifest is not None:
        require_gate(manifest, chosen.name, compute)
    described = EngineFile(
        model_file,
        info=slot_model_info(manifest, path) if manifest is not None else None,
        precision=manifest.engine.precision if manifest is not None else None,
        threads=threads,
        compute=compute,
    )
    engine = chosen.engine(described)
    engine.load()
    try:
        engine.warmup()
    except Exception:
        engine.close()
        raise
    return OpenedEngine(engine, chosen, path, manifest)


def require_gate(manifest: Manifest, backend: str, compute: str) -> None:
    """Refuse to run a bundle on an engine and precision its accuracy gate never judged.

    A bundle runs as built: its ONNX model on ONNX Runtime (FP32, or INT8 judged by the gate it
    carries), its TensorRT plan on TensorRT, and an FP32 model on OpenVINO in FP32, which computes
    what ONNX Runtime does (the flash self-test checks it on the reference frame). Anything else
    (BF16, or an INT8 model's other INT8 kernels) moves counts by cells, so it needs a passing gate
    for exactly this model, filed under ``backend:precision`` when the bundle was made.

    Raises:
        BundleError: no passing gate for that engine and precision.
    """
    spec = manifest.engine
    as_built = spec.kind == "tensorrt" or backend == "onnxruntime"
    if as_built or (compute == "fp32" and spec.precision == "fp32"):
        return
    key = f"{backend}:{compute}"
    gate = manifest.compute_gates.get(key)
    if gate is None:
        carried = ", ".join(sorted(manifest.compute_gates)) or "none"
        raise BundleError(
            f"bundle {manifest.name!r} carries no accuracy gate for {backend} at {compute} (it carries: {carried}); "
            f"run 'cellseg gate' for it and make the bundle with --compute-gate, or set engine.precision: fp32"
        )
    if not gate.get("passed") or gate.get("candidate", {}).get("sha256") != manifest.engine_entry.sha256:
        raise BundleError(f"bundle {manifest.name!r}: its {key} gate did not pass for this model")


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
    candidates: Sequence[tuple[str | None, Path]],
    backend: str = AUTO,
    threads: int | None = None,
    backends: Mapping[str, Backend] = BACKENDS,
    *,
    compute: str = "fp32",
) -> tuple[OpenedEngine, str | None, list[str]]:
    """The first candidate that loads, its slot name, and why the ones before it did not."""
    errors: list[str] = []
    for target, path in candidates:
        try:
            return open_engine(path, backend, threads, backends, compute=compute), target, errors
        except CellsegError as e:
            reason = str(e) if str(path) in str(e) else f"{path}: {e}"  # most errors name the path already
            errors.append(reason)
            logger.error("cannot run engine: %s", reason)
    raise ConfigError("no engine can be loaded: " + "; ".join(errors))


def pipeline_for(opened: OpenedEngine, config: Config | None = None) -> Pipeline:
    """The pipeline its backend runs around an opened engine (for TensorRT: pre- and
    post-processing in CUDA kernels, masks copied back only when asked for).

    ``config``: the device configuration, whose postprocess overrides, pixel size and tiling apply
    (the model's own thresholds and automatic tiling when ``None``), and whose state folder keeps
    compiled kernels. Frames larger than the model's training frames go through in tiles
    (:mod:`cellseg.edge.pipeline.tiling`).
    """
    info = opened.engine.info
    if config is None:
        return with_tiling(opened.backend.pipeline(opened.engine, PipelineSettings(info.thresholds)),
                           TileSettings.resolve("auto", info))  # fmt: skip
    p, t, pixel_um = config.postprocess, config.tiling, config.measurement.pixel_size_um
    settings = PipelineSettings(
        info.thresholds.overridden(conf=p.conf, iou=p.iou, max_det=p.max_det), pixel_um, config.state_dir / "kernels"
    )
    tiles = TileSettings.resolve(t.mode, info, tile_px=t.tile_px, overlap_px=t.overlap_px, pixel_size_um=pixel_um)
    return with_tiling(opened.backend.pipeline(opened.engine, settings), tiles, pixel_um)
