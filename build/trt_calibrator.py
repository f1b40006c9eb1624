"""TensorRT's implicit INT8 entropy calibrator, fed by the device's own preprocessing.

Only the fallback for an FP32 ONNX built as INT8 (see :mod:`cellseg.build.engine_build`); the
explicit Q/DQ path needs none of this. Runs on the target: imports tensorrt and pycuda.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.pipeline.model_info import ModelInfo
from cellseg.edge.pipeline.preprocess import Preprocessor
from cellseg.edge.pipeline.types import Frame


def EntropyCalibrator(trt: Any, onnx_path: Path, images: list[Path], cache: Path) -> Any:  # noqa: N802 -- a class factory
    import onnx
    import pycuda.driver as cuda

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    info = ModelInfo.from_metadata(meta, onnx_path)
    pre = Preprocessor(info.input_width, info.input_height, info.mapping)

    # TensorRT calls get_batch from inside build_serialized_network, on the CUDA runtime's primary
    # context of device 0; pycuda needs that context current for its own calls (there is none
    # otherwise: mem_alloc raised LogicError), so each call pushes and pops it.
    cuda.init()
    context = cuda.Device(0).retain_primary_context()

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._pending = list(images)
            nbytes = 3 * info.input_width * info.input_height * np.dtype(np.float32).itemsize
            context.push()
            try:
                self._device = cuda.mem_alloc(nbytes)
            finally:
                context.pop()

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if not self._pending:
                return None
            path = self._pending.pop(0)
            tensor, _ = pre(Frame(read_image(path), source=str(path)))
            context.push()
            try:
                cuda.memcpy_htod(self._device, np.ascontiguousarray(tensor, dtype=np.float32))
            finally:
                context.pop()
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.write_bytes(bytes(data))

    return _Calibrator()
