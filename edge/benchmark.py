"""``cellseg bench``: inference speed of this machine's engine, as users quote it.

Device, precision, images/s, ms/image and the per-stage split, on the bundled sample frames or
on frames the user names. The frames are decoded once, so the numbers are the pipeline's.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellseg.edge.engine import Engine
from cellseg.edge.imageio import read_image
from cellseg.edge.predictor import Predictor
from cellseg.edge.types import Frame

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
        return "\n".join(
            [head, "-" * len(head), row, "", f"per stage (median ms): {split}", f"engine {self.engine}; {runs}"]
        )


def device_name() -> str:
    """The board (Jetsons name themselves in the device tree) or the CPU model, and its core count."""
    name = platform.processor() or platform.machine()
    board = Path("/proc/device-tree/model")
    cpuinfo = Path("/proc/cpuinfo")
    if board.is_file():
        name = board.read_text(errors="replace").strip("\x00\n ")
    elif cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        name = models[0] if models else name
    return f"{name} ({os.cpu_count()} cores)"


def run_bench(engine: Engine, images: list[Path], runs: int = 5, warmup: int = 2) -> BenchReport:
    """Time the pipeline on ``images`` (already loaded engine), ``runs`` passes after ``warmup`` frames."""
    frames = [Frame(read_image(p), source=str(p)) for p in images]
    predictor = Predictor(engine)
    for frame in frames[:warmup]:
        predictor(frame)
    latencies, cells = [], []
    start = time.perf_counter()
    for _ in range(runs):
        for frame in frames:
            m = predictor(frame).measurement
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
        stage_ms={s: statistics.median(lat[s] for lat in latencies) for s in STAGES},
        cells_per_frame=statistics.median(cells),
    )
