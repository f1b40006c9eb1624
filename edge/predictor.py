"""One frame through the whole device pipeline: preprocess -> engine -> postprocess -> measure."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from cellseg.edge.engine import Engine
from cellseg.edge.measure import measure
from cellseg.edge.postprocess import PostprocessConfig, Postprocessor
from cellseg.edge.preprocess import Preprocessor
from cellseg.edge.types import Detections, Frame, Measurement


@dataclass(frozen=True)
class Result:
    detections: Detections
    measurement: Measurement


class Predictor:
    """Runs frames through a loaded engine, timing each stage with a monotonic clock.

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

    def __call__(
        self, frame: Frame, extra_latencies_ms: dict[str, float] | None = None, *, want_masks: bool = True
    ) -> Result:
        """``want_masks`` is accepted for parity with the GPU predictor; on the CPU the masks are
        always computed (areas and confluence come from them) and returned."""
        t0 = time.perf_counter()
        tensor, letterbox = self.preprocessor(frame)
        t1 = time.perf_counter()
        raw = self.engine.infer(tensor)
        t2 = time.perf_counter()
        detections = self.postprocessor(raw, letterbox)
        t3 = time.perf_counter()
        m = measure(frame, detections, None, self.pixel_size_um, self.engine.engine_id)
        t4 = time.perf_counter()
        latencies = dict(extra_latencies_ms or {})
        latencies.update(
            preprocess=(t1 - t0) * 1e3, infer=(t2 - t1) * 1e3, postprocess=(t3 - t2) * 1e3, measure=(t4 - t3) * 1e3
        )
        return Result(detections, replace(m, latencies_ms=latencies))
