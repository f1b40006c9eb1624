"""``cellseg build-engine``: a TensorRT plan from an ONNX model, on the device it will run on.

FP16 from the FP32 ONNX; INT8 from the Q/DQ ONNX of ``cellseg quantize`` (explicit quantisation:
TensorRT takes the scales from the Q/DQ nodes and needs no calibrator). An FP32 ONNX asked for
INT8 falls back to TensorRT's implicit entropy calibrator over calibration images -- the path
TensorRT 10 deprecates and the one to avoid: the gate never saw that model.

Networks are weakly typed: the builder flags choose precision (FP16; INT8 with FP16 for what
the Q/DQ nodes leave in float). TensorRT 10 also offers strongly typed networks, where the ONNX's
own tensor types decide; on our FP32 + Q/DQ model that would run every unquantised layer (the
head's decode, the prototypes) in FP32, slower than today's INT8 + FP16, and moving to it means a
mixed-precision ONNX (FP16 casts in the graph, NVIDIA's ModelOpt AutoCast) that the accuracy gate
judges instead. Weak typing is deprecated from 10.12 and gone in 11, which drops the precision
flags: :func:`~cellseg.edge.engines.tensorrt_engine.supported_tensorrt` refuses 11 until the build makes
that move (JetPack 6 ships 8.6 and 10.3, where weak typing is the supported default).

The build differs between TensorRT 8.6 (JetPack 6.0) and 10.x (JetPack 6.1/6.2): :func:`plan_build`
decides everything version-dependent from the version string alone (testable anywhere, and its
flag names checked against both versions' real bindings in tests/build/test_tensorrt_api.py);
:func:`build_engine` carries it out. The ``tensorrt`` import stays inside the functions that run
on the target. Next to the plan goes ``<plan>.json`` (TensorRT version, GPU, L4T, precision,
the ONNX's sha256, build time), which ``cellseg bundle`` turns into the manifest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cellseg.edge.device import DeviceFacts
from cellseg.edge.engines.tensorrt_engine import supported_tensorrt, tensorrt_logger
from cellseg.edge.errors import ConfigError, DependencyError, ModelError
from cellseg.edge.hashing import file_sha256

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "int8"]
HEARTBEAT_S = 15.0


@dataclass(frozen=True)
class BuildPlan:
    """Every version- and precision-dependent choice of a build.

    Attributes:
        api: the TensorRT major version: 8 (8.6, whose networks need the explicit-batch flag) or 10.
        network_flags: names of ``NetworkDefinitionCreationFlag`` members to set.
        builder_flags: names of ``BuilderFlag`` members to set.
        calibrator: the implicit INT8 calibrator is needed (no Q/DQ in the model).
        progress_monitor: TensorRT reports build phases (``IProgressMonitor``, 10.x).
        workspace_bytes: the workspace memory-pool limit.
    """

    api: int
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    calibrator: bool
    progress_monitor: bool
    workspace_bytes: int


def plan_build(version: str, precision: Precision, has_qdq: bool, workspace_mb: int = 1024) -> BuildPlan:
    if workspace_mb < 64:
        raise ConfigError(f"workspace of {workspace_mb} MB is too small to build a segmentation engine (>= 64)")
    api = supported_tensorrt(version)
    if precision == "fp16":
        if has_qdq:
            raise ModelError("this ONNX has Q/DQ nodes (an INT8 model); build it with --precision int8")
        flags: tuple[str, ...] = ("FP16",)
    elif precision == "int8":
        # FP16 as well, so the layers left in float (the head's decode) run in half, not single.
        flags = ("INT8", "FP16")
    else:
        raise ConfigError(f"precision must be fp16 or int8, got {precision!r}")
    return BuildPlan(
        api=api,
        network_flags=("EXPLICIT_BATCH",) if api == 8 else (),  # implicit in 10, the flag is gone
        builder_flags=flags,
        calibrator=precision == "int8" and not has_qdq,
        progress_monitor=api >= 10,
        workspace_bytes=workspace_mb * 1024 * 1024,
    )


def onnx_has_qdq(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


@dataclass(frozen=True)
class BuildReport:
    precision: str
    tensorrt_version: str
    compute_capability: str
    l4t: str | None
    onnx_sha256: str
    build_seconds: float
    plan: dict[str, Any]
    validation: dict[str, Any] | None = None

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


def _heartbeat(stop: threading.Event, say: Callable[[str], None]) -> None:
    start = time.monotonic()
    while not stop.wait(HEARTBEAT_S):
        say(f"still building ({time.monotonic() - start:.0f} s); TensorRT is timing kernels")


def build_engine(
    onnx_path: Path,
    output: Path,
    precision: Precision,
    *,
    workspace_mb: int = 1024,
    timing_cache: Path | None = None,
    calibration_images: list[Path] | None = None,
    say: Callable[[str], None] = print,
) -> BuildReport:
    """Build and serialise the plan, write its report beside it; returns the report."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DependencyError(
            "tensorrt", "trt", "building a TensorRT engine (run it on the Jetson, where JetPack provides TensorRT)"
        ) from e
    facts = DeviceFacts.detect()
    if facts.compute_capability is None:
        raise DependencyError("pycuda", "trt", "building a TensorRT engine needs a GPU answering through CUDA;")
    plan = plan_build(trt.__version__, precision, onnx_has_qdq(onnx_path), workspace_mb)
    if plan.calibrator and not calibration_images:
        raise ConfigError(
            "INT8 from an ONNX without Q/DQ nodes needs calibration images (--calibration); better: "
            "quantise it with 'cellseg quantize' so the accuracy gate checks the INT8 model"
        )
    trt_logger = tensorrt_logger(trt)
    builder = trt.Builder(trt_logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    calibrator = None
    if plan.calibrator:
        from cellseg.build.trt_calibrator import EntropyCalibrator

        logger.warning("INT8 without Q/DQ: TensorRT's implicit calibrator (deprecated in TensorRT 10)")
        calibrator = EntropyCalibrator(trt, onnx_path, calibration_images or [], output.with_suffix(".calib"))
        config.int8_calibrator = calibrator
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, say) if plan.progress_monitor else None
    if monitor is not None:
        config.progress_monitor = monitor
    say(f"building {precision} engine from {onnx_path.name} with TensorRT {trt.__version__} ({facts.describe()})")
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(stop, say), daemon=True)
    start = time.monotonic()
    beat.start()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        stop.set()
        beat.join()
    seconds = time.monotonic() - start
    if serialized is None:
        raise ModelError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(output)
    if cache is not None and timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    report = BuildReport(
        precision=precision,
        tensorrt_version=str(trt.__version__),
        compute_capability=facts.compute_capability,
        l4t=facts.l4t,
        onnx_sha256=file_sha256(onnx_path),
        build_seconds=round(seconds, 1),
        plan=asdict(plan),
    )
    report.write(output.with_suffix(".json"))
    say(f"wrote {output} in {seconds:.0f} s")
    return report


def _progress_monitor(trt: Any, say: Callable[[str], None]) -> Any:
    class Monitor(trt.IProgressMonitor):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._steps[phase_name] = num_steps
            if parent_phase is None:
                say(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            self._steps.pop(phase_name, None)

    return Monitor()


def validate_engine(plan: Path, onnx_path: Path, report: BuildReport, frames: list[Path]) -> dict[str, Any]:
    """Run the built engine and the ONNX model on the same frames through the device pipeline;
    the result goes into the plan's report. Needs the GPU the plan was built on."""
    import dataclasses

    from cellseg.edge.capture.imageio import read_image
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
    from cellseg.edge.engines.tensorrt_engine import TensorRTEngine
    from cellseg.edge.pipeline.host import HostPipeline
    from cellseg.edge.pipeline.types import Frame

    rows: list[dict[str, Any]] = []
    with (
        OnnxRuntimeEngine(onnx_path) as reference,
        TensorRTEngine(plan, reference.info, precision=report.precision) as engine,
    ):
        engine.warmup(3)
        for path in frames:
            frame = Frame(read_image(path), source=path.name)
            want = HostPipeline(reference)(frame).measurement
            got = HostPipeline(engine)(frame).measurement
            rows.append({
                "frame": path.name, "count": got.count, "onnx_count": want.count,
                "confluence_pct": round(got.confluence_pct, 3), "onnx_confluence_pct": round(want.confluence_pct, 3),
                "infer_ms": round(got.latencies_ms["infer"], 2),
            })  # fmt: skip
    worst_count = max((abs(r["count"] - r["onnx_count"]) / max(r["onnx_count"], 1) for r in rows), default=0.0)
    worst_conf = max((abs(r["confluence_pct"] - r["onnx_confluence_pct"]) for r in rows), default=0.0)
    validation = {
        "passed": worst_count <= 0.05 and worst_conf <= 1.0,
        "worst_count_diff_pct": round(100 * worst_count, 2),
        "worst_confluence_diff_pp": round(worst_conf, 3),
        "frames": rows,
    }
    updated = dataclasses.replace(report, validation=validation)
    updated.write(plan.with_suffix(".json"))
    return validation
