"""OpenVINO backend: the ONNX model compiled for this CPU, at the precision asked for.

FP32 by default and always by explicit choice: OpenVINO would otherwise run an FP32 model in
BF16 on its own wherever the CPU has BF16 (AMX, AVX-512 BF16), which moves cell counts as much
as INT8 does. ``bf16`` is taken only where the CPU offers it; a Q/DQ model (``cellseg
quantize``) runs its quantised layers in INT8 either way. Threads are given explicitly and not
pinned to cores, as for ONNX Runtime: the service's system-call filter refuses
``sched_setaffinity``, and a lab PC runs other programs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.device import physical_cores
from cellseg.edge.engines.base import LoadedInWith, RawOutputs
from cellseg.edge.errors import ConfigError, DependencyError, ModelError
from cellseg.edge.hashing import file_sha256
from cellseg.edge.pipeline.model_info import ModelInfo

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def _ov() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise DependencyError("openvino", "openvino", "the OpenVINO engine") from e
    return openvino


def cpu_precisions() -> set[str]:
    """What this CPU computes natively, as OpenVINO says (``fp32``, ``bf16``, ``int8``...)."""
    core = _ov().Core()
    return {str(c).lower() for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


class OpenVinoEngine(LoadedInWith):
    """Runs a YOLO-seg ONNX export with OpenVINO on the CPU.

    Args:
        path: the ``.onnx`` file.
        precision: ``fp32`` or ``bf16`` (the float layers; a Q/DQ model's quantised ones run INT8).
        threads: inference threads (default: the physical cores this process may run on).
    """

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.path = Path(path)
        self.compute = precision
        self.threads = threads
        self.info: ModelInfo
        self.engine_id = ""
        self.precision = precision
        self._compiled: Any = None
        self._outputs: list[Any] = []

    def load(self) -> None:
        ov = _ov()
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such model file")
        core = ov.Core()
        if self.compute == "bf16" and "bf16" not in cpu_precisions():
            raise ConfigError(f"this CPU has no BF16 ({', '.join(sorted(cpu_precisions()))}); use fp32")
        try:
            model = core.read_model(str(self.path))
        except RuntimeError as e:  # OpenVINO raises RuntimeError for files it cannot read
            raise ModelError(f"{self.path}: OpenVINO cannot read it: {e}") from e
        # The ONNX file's metadata_props, as OpenVINO keeps them.
        rt_info = model.get_rt_info()
        framework = rt_info["framework"] if "framework" in rt_info else {}  # noqa: SIM401 -- an RTMap has no .get
        meta = {str(k): v.astype(str) for k, v in framework.items()}
        info = ModelInfo.from_metadata(meta, self.path)
        shape = [int(d) for d in model.inputs[0].get_shape()]
        if shape != [1, 3, info.input_height, info.input_width] or len(model.outputs) != 2:
            raise ModelError(f"{self.path}: expected one 1x3x{info.input_height}x{info.input_width} input and two "
                             f"outputs, got {shape} and {len(model.outputs)} outputs")  # fmt: skip
        config = {
            "INFERENCE_PRECISION_HINT": PRECISIONS[self.compute],
            "INFERENCE_NUM_THREADS": self.threads if self.threads is not None else physical_cores(),
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
        }
        try:
            self._compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:
            raise ModelError(f"{self.path}: OpenVINO cannot compile it: {e}") from e
        self._outputs = list(self._compiled.outputs)
        self.info = info
        quantised = str(info.extra.get("precision", "")) == "int8"
        # As ONNX Runtime reports a Q/DQ model: int8; its float layers in BF16 are said too.
        self.precision = ("int8" if self.compute == "fp32" else f"int8+{self.compute}") if quantised else self.compute
        self.engine_id = f"openvino:{self.path.name}:{file_sha256(self.path)[:12]}:{self.compute}"
        logger.info("loaded %s with OpenVINO %s (%s)", self.path, ov.__version__, self.precision)

    def warmup(self, runs: int = 1) -> None:
        blank = np.full((1, 3, self.info.input_height, self.info.input_width), 114 / 255, np.float32)
        for _ in range(runs):
            self.infer(blank)

    def infer(self, tensor: npt.NDArray[np.float32]) -> RawOutputs:
        if self._compiled is None:
            raise ModelError("engine is not loaded (call load() first)")
        result = self._compiled(np.ascontiguousarray(tensor, dtype=np.float32))
        predictions, prototypes = (np.asarray(result[o], np.float32)[0] for o in self._outputs)
        return RawOutputs(predictions, prototypes)

    def close(self) -> None:
        self._compiled = None
        self._outputs = []
