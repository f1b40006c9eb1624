"""A third backend in one module, as a user adding one would write it: OpenCV's DNN module
running the ONNX model on the CPU. Its engine keeps the Engine contract (load, warm up, infer,
close, ``info``, ``engine_id``, ``precision``); the host pipeline does the rest, so registering it
is one line: ``{"opencv-dnn": OPENCV_DNN, **BACKENDS}``.

Here it is what proves that claim (tests/edge/test_backends.py runs the daemon with it); OpenCV
DNN is also a real engine, agreeing with ONNX Runtime to ~1e-4 on the shipped model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.engines.base import LoadedInWith, RawOutputs
from cellseg.edge.engines.registry import Backend, EngineFile, host_pipeline
from cellseg.edge.errors import ModelError
from cellseg.edge.hashing import file_sha256
from cellseg.edge.pipeline.model_info import ModelInfo


class OpenCvDnnEngine(LoadedInWith):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.info: ModelInfo
        self.engine_id = ""
        self.precision = "fp32"
        self.inferences = 0
        self._net: Any = None

    def load(self) -> None:
        import cv2
        import onnx

        model = onnx.load(str(self.path), load_external_data=False)
        self.info = ModelInfo.from_metadata({p.key: p.value for p in model.metadata_props}, self.path)
        try:
            self._net = cv2.dnn.readNetFromONNX(str(self.path))
        except cv2.error as e:
            raise ModelError(f"{self.path}: OpenCV DNN cannot load it: {e}") from e
        self.engine_id = f"opencv-dnn:{self.path.name}:{file_sha256(self.path)[:12]}"

    def warmup(self, runs: int = 1) -> None:
        blank = np.full((1, 3, self.info.input_height, self.info.input_width), 114 / 255, np.float32)
        for _ in range(runs):
            self.infer(blank)

    def infer(self, tensor: npt.NDArray[np.float32]) -> RawOutputs:
        self._net.setInput(tensor)
        predictions, prototypes = self._net.forward(["output0", "output1"])
        self.inferences += 1
        return RawOutputs(predictions[0].astype(np.float32), prototypes[0].astype(np.float32))

    def close(self) -> None:
        self._net = None


def _engine(file: EngineFile) -> OpenCvDnnEngine:
    return OpenCvDnnEngine(file.path)


OPENCV_DNN = Backend("opencv-dnn", ("onnx",), _engine, host_pipeline)
