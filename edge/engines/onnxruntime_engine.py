"""ONNX Runtime backend: the CPU engine (and the embedded default), FP32 or INT8 Q/DQ models."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.device import physical_cores
from cellseg.edge.engines.base import LoadedInWith, RawOutputs
from cellseg.edge.errors import DependencyError, ModelError
from cellseg.edge.hashing import file_sha256
from cellseg.edge.pipeline.model_info import ModelInfo

logger = logging.getLogger(__name__)


class OnnxRuntimeEngine(LoadedInWith):
    """Runs a YOLO-seg ONNX export with ONNX Runtime on the CPU.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (``None``: the physical cores this process may run on, which
            is ONNX Runtime's own default, but given explicitly: with an implicit count ONNX
            Runtime pins its threads to cores, which the service's system-call filter refuses
            (``sched_setaffinity`` is in ``@resources``) and which fights other programs on a
            shared lab PC).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.threads = threads
        self._session: Any = None
        self._input_name = ""
        self._output_names: list[str] = []
        self.info: ModelInfo
        self.engine_id = ""
        self.precision = "fp32"

    def load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise DependencyError("onnxruntime", "cpu", "the ONNX Runtime engine") from e
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such model file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads if self.threads is not None else physical_cores()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own untyped errors for corrupt or truncated files
            raise ModelError(f"{self.path}: ONNX Runtime cannot load it: {e}") from e
        meta = dict(session.get_modelmeta().custom_metadata_map)
        info = ModelInfo.from_metadata(meta, self.path)
        self._check_signature(session, info)
        self._session = session
        self._input_name = session.get_inputs()[0].name
        self._output_names = [o.name for o in session.get_outputs()]
        self.info = info
        self.engine_id = f"onnx:{self.path.name}:{file_sha256(self.path)[:12]}"
        # Quantisation records the precision in the metadata; plain exports are FP32.
        self.precision = str(info.extra.get("precision", "fp32"))
        logger.info(
            "loaded %s (%s, %dx%d, classes %s)",
            self.path,
            self.precision,
            info.input_width,
            info.input_height,
            ",".join(info.class_names),
        )

    def _check_signature(self, session: Any, info: ModelInfo) -> None:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        expected_in = [1, 3, info.input_height, info.input_width]
        if len(inputs) != 1 or list(inputs[0].shape) != expected_in:
            got = [(i.name, i.shape) for i in inputs]
            raise ModelError(
                f"{self.path}: not a YOLO-seg export: expected one input of shape {expected_in}, got {got}"
            )
        shapes = [list(o.shape) for o in outputs]
        if len(outputs) != 2 or len(shapes[0]) != 3 or len(shapes[1]) != 4:
            raise ModelError(
                f"{self.path}: not a YOLO-seg export: expected outputs (1, 4+nc+nm, A) and (1, nm, h, w), got {shapes}"
            )
        nm = shapes[1][1]
        if shapes[0][1] != 4 + info.num_classes + nm:
            raise ModelError(
                f"{self.path}: output0 has {shapes[0][1]} rows but 4 + {info.num_classes} classes + {nm} "
                "mask coefficients were expected from its metadata"
            )

    def warmup(self, runs: int = 1) -> None:
        """Run the model on a grey image so the first real frame is not the slow one."""
        dummy = np.full((1, 3, self.info.input_height, self.info.input_width), 114 / 255, dtype=np.float32)
        for _ in range(runs):
            self.infer(dummy)

    def infer(self, tensor: npt.NDArray[np.float32]) -> RawOutputs:
        if self._session is None:
            raise ModelError("engine is not loaded (call load() first)")
        preds, protos = self._session.run(self._output_names, {self._input_name: tensor})
        return RawOutputs(predictions=preds[0], prototypes=protos[0])

    def close(self) -> None:
        self._session = None
