"""The host pipeline: preprocess (numpy/OpenCV) -> any engine -> postprocess (numpy) -> measure,
each stage timed. It serves every backend whose engine hands raw outputs back to the host."""

from __future__ import annotations

import time
from dataclasses import replace

from cellseg.edge.engines.base import Engine
from cellseg.edge.pipeline.contract import FrameResult
from cellseg.edge.pipeline.measure import measure
from cellseg.edge.pipeline.postprocess import PostprocessConfig, Postprocessor
from cellseg.edge.pipeline.preprocess import Preprocessor
from cellseg.edge.pipeline.types import Frame


class HostPipeline:
    """Runs frames through a loaded engine, timing each stage with a monotonic clock; keeps the
    :class:`~cellseg.edge.pipeline.contract.Pipeline` contract.

    Args:
        engine: a loaded engine.
        config: postprocess thresholds (default: those shipped with the model).
        pixel_size_um: micrometres per pixel, for areas in µm².
    """

    def __init__(
        self, engine: Engine, config: PostprocessConfig | None = None, pixel_size_um: float | None = None
    ) -> None:
        self.engine = engine
        self.config = config or engine.info.thresholds
        self.pixel_size_um = pixel_size_um
        self.postprocessor = Postprocessor(self.config)
        self.preprocessor = Preprocessor(engine.info.input_width, engine.info.input_height, engine.info.mapping)

    def __call__(self, frame: Frame, *, want_masks: bool = False) -> FrameResult:
        """The masks are always computed here (areas and confluence come from them) and returned."""
        t0 = time.perf_counter()
        tensor, letterbox = self.preprocessor(frame)
        t1 = time.perf_counter()
        raw = self.engine.infer(tensor)
        t2 = time.perf_counter()
        detections = self.postprocessor(raw, letterbox)
        t3 = time.perf_counter()
        m = measure(frame, detections, None, self.pixel_size_um, self.engine.engine_id)
        t4 = time.perf_counter()
        latencies = {"preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3,
                     "measure": (t4 - t3) * 1e3}  # fmt: skip
        return FrameResult(detections, replace(m, latencies_ms=latencies))

    def engine_rate(self, frame: Frame, count: int) -> float:
        tensor, _ = self.preprocessor(frame)
        start = time.perf_counter()
        for _ in range(count):
            self.engine.infer(tensor)
        return count / (time.perf_counter() - start)
