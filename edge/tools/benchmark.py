"""``cellseg bench``: inference speed of this machine's engine, as users quote it.

Device, precision, images/s, ms/image and the per-stage split, on the bundled sample frames or
on frames the user names. The frames are decoded once, so the numbers are the pipeline's. Also
the engine alone (the same input, over and over: on a GPU its input stays on the device) and
what share of that rate the whole pipeline keeps — the number that tells whether pre- and
post-processing hold the engine back.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.device import device_name
from cellseg.edge.engines.base import Engine
from cellseg.edge.pipeline.contract import Pipeline
from cellseg.edge.pipeline.host import HostPipeline
from cellseg.edge.pipeline.types import Frame

STAGES = ("preprocess", "infer", "postprocess", "measure")


@dataclass
class BenchReport:
    device: str
    engine: str
    precision: str
    input_size: str
    frames: int
    runs: int
    images_per_s: float
    ms_per_image: float
    stage_ms: dict[str, float] = field(default_factory=dict)
    cells_per_frame: float = 0.0
    engine_images_per_s: float = 0.0  # the engine alone, on one prepared input

    @property
    def pipeline_share(self) -> float:
        """End-to-end images/s as a fraction of the engine's own."""
        return self.images_per_s / self.engine_images_per_s if self.engine_images_per_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        head = f"{'device':<34}{'precision':>10}{'input':>10}{'images/s':>10}{'ms/image':>10}"
        row = (
            f"{self.device[:33]:<34}{self.precision:>10}{self.input_size:>10}"
            f"{self.images_per_s:>10.2f}{self.ms_per_image:>10.1f}"
        )
        split = "  ".join(f"{k} {v:.1f}" for k, v in self.stage_ms.items())
        runs = f"{self.frames} frames x {self.runs} runs; {self.cells_per_frame:.0f} cells/frame (median)"
        lines = [head, "-" * len(head), row, "", f"per stage (median ms): {split}"]
        if self.engine_images_per_s:
            lines.append(f"engine alone {self.engine_images_per_s:.2f} images/s; end to end keeps "
                         f"{100 * self.pipeline_share:.0f}% of it")  # fmt: skip
        return "\n".join([*lines, f"engine {self.engine}; {runs}"])


def run_bench(
    engine: Engine,
    images: list[Path],
    runs: int = 5,
    warmup: int = 2,
    *,
    pipeline: Pipeline | None = None,
    engine_alone: bool = True,
) -> BenchReport:
    """Time the pipeline on ``images`` (already loaded engine), ``runs`` passes after ``warmup`` frames.

    ``pipeline``: the one around ``engine`` its backend runs (default: the host pipeline).
    ``engine_alone``: also time the engine by itself (as many inferences again).
    """
    frames = [Frame(read_image(p), source=str(p)) for p in images]
    pipeline = pipeline if pipeline is not None else HostPipeline(engine)
    for frame in frames[:warmup]:
        pipeline(frame)
    latencies, cells = [], []
    start = time.perf_counter()
    for _ in range(runs):
        for frame in frames:
            m = pipeline(frame).measurement
            latencies.append(m.latencies_ms)
            cells.append(m.count)
    wall = time.perf_counter() - start
    n = len(latencies)
    return BenchReport(
        device=device_name(),
        engine=engine.engine_id,
        precision=engine.precision,
        input_size=f"{engine.info.input_width}x{engine.info.input_height}",
        frames=len(frames),
        runs=runs,
        images_per_s=n / wall,
        ms_per_image=1e3 * wall / n,
        stage_ms={s: statistics.median(lat[s] for lat in latencies) for s in STAGES if s in latencies[0]},
        cells_per_frame=statistics.median(cells),
        engine_images_per_s=pipeline.engine_rate(frames[0], n) if engine_alone else 0.0,
    )
