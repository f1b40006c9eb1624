"""One frame through the TensorRT engine with pre- and post-processing on the GPU.

frame (host) -> upload -> letterbox kernel writes the engine's input buffer -> TensorRT ->
postprocess kernels read the engine's output buffers -> boxes, scores, areas, covered pixels
(and the cropped masks only when ``want_masks``) come back, as the same
:class:`~cellseg.edge.pipeline.types.Detections` and measurement as the host pipeline's
(:class:`~cellseg.edge.pipeline.contract.Pipeline`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cellseg.edge.engines.cuda_kernels import GpuPostprocess, GpuPreprocess, KernelRunner, PycudaRunner
from cellseg.edge.engines.kernel_compile import kernel_cubins
from cellseg.edge.engines.tensorrt_engine import IoPlan, TensorRTEngine
from cellseg.edge.errors import ModelError, NvrtcMissingError
from cellseg.edge.pipeline.contract import FrameResult
from cellseg.edge.pipeline.measure import measure
from cellseg.edge.pipeline.model_info import PostprocessConfig
from cellseg.edge.pipeline.types import Frame

logger = logging.getLogger(__name__)


def check_gpu_outputs(io: IoPlan) -> None:
    """The postprocess kernels read float32 outputs: an engine with FP16 outputs is refused, by
    name, before any frame (its input may be FP16: the preprocess kernel writes either)."""
    for t in (io.predictions, io.prototypes):
        if t.dtype != "float32":
            raise ModelError(
                f"engine output {t.name!r} is {t.dtype}; the GPU postprocess reads float32 outputs. Build the "
                "engine with float32 outputs (cellseg build-engine keeps the ONNX model's float32 outputs)"
            )


def device_cubins(cache: Path | None) -> dict[str, bytes] | None:
    """The kernels compiled by NVRTC for the GPU of the current CUDA context (cached in ``cache``),
    or None where this machine has no NVRTC: pycuda then compiles them with nvcc."""
    import pycuda.driver as cuda

    major, minor = cuda.Context.get_device().compute_capability()
    try:
        return kernel_cubins(f"sm_{major}{minor}", cache)
    except NvrtcMissingError as e:
        logger.warning("%s; compiling the kernels with nvcc instead, which must be on the PATH", e)
        return None


class CudaPipeline:
    """The TensorRT backend's pipeline (keeps the
    :class:`~cellseg.edge.pipeline.contract.Pipeline` contract).

    Args:
        engine: a loaded TensorRT engine.
        config: postprocess thresholds (default: those shipped with the model).
        pixel_size_um: micrometres per pixel, for areas in µm².
        runner: runs the kernels (default: pycuda, from NVRTC's cubins; tests pass an emulation).
        kernel_cache: where NVRTC's cubins are kept between starts.
    """

    def __init__(
        self,
        engine: TensorRTEngine,
        config: PostprocessConfig | None = None,
        pixel_size_um: float | None = None,
        runner: KernelRunner | None = None,
        *,
        kernel_cache: Path | None = None,
    ) -> None:
        if engine.io is None:
            raise ModelError("load the engine before building its pipeline")
        self.engine = engine
        self.config = config or engine.info.thresholds
        self.pixel_size_um = pixel_size_um
        with engine.active():
            self.runner = runner or PycudaRunner(device_cubins(kernel_cache))
        io = engine.io
        info = engine.info
        check_gpu_outputs(io)
        self.preprocess = GpuPreprocess(self.runner, info.input_width, info.input_height, info.mapping,
                                        output=engine.device_buffer(io.input.name), dtype=io.input.dtype)  # fmt: skip
        self.postprocess = GpuPostprocess(self.runner, self.config)
        self._pred = (engine.device_buffer(io.predictions.name), io.predictions.shape[1:])
        self._proto = (engine.device_buffer(io.prototypes.name), io.prototypes.shape[1:])

    def __call__(self, frame: Frame, *, want_masks: bool = False) -> FrameResult:
        with self.engine.active():
            t0 = time.perf_counter()
            _, letterbox = self.preprocess(frame)
            t1 = time.perf_counter()
            self.engine.execute_on_device()
            t2 = time.perf_counter()
            pred, pred_shape = self._pred
            proto, proto_shape = self._proto
            det = self.postprocess(pred, proto, pred_shape, proto_shape, letterbox, want_masks=want_masks)  # type: ignore[arg-type]
            t3 = time.perf_counter()
        latencies = {"preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
        return FrameResult(det, measure(frame, det, latencies, self.pixel_size_um, self.engine.engine_id))

    def engine_rate(self, frame: Frame, count: int) -> float:
        """The input written once on the device and the engine run on it; nothing copied."""
        with self.engine.active():
            self.preprocess(frame)
            start = time.perf_counter()
            for _ in range(count):
                self.engine.execute_on_device()
            return count / (time.perf_counter() - start)
