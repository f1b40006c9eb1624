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


# What ``cellseg bench --compare`` tries, in this order: (backend, precision asked, the INT8 model);
# the first is the reference of the ratios and of the differences.
CANDIDATES = (
    ("onnxruntime", "fp32", False),
    ("onnxruntime", "fp32", True),
    ("openvino", "fp32", False),
    ("openvino", "bf16", False),
    ("openvino", "fp32", True),
)


@dataclass
class Comparison:
    """One backend and precision on the same frames as the others: its speed, or why it could
    not run here; how far its counts are from the reference's, frame by frame; and, when the
    accuracy gate was run, its verdict."""

    backend: str
    precision: str
    model: str = ""
    report: BenchReport | None = None
    unavailable: str = ""
    ratio: float = 0.0  # images/s over the reference's
    max_count_diff: int = 0
    mean_confluence_diff_pp: float = 0.0
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "report"}
        out["report"] = self.report.to_dict() if self.report is not None else None
        return out


def compare_backends(
    model: Path,
    images: list[Path],
    runs: int = 3,
    threads: int | None = None,
    *,
    int8_model: Path | None = None,
) -> list[Comparison]:
    """Each of :data:`CANDIDATES` this machine has, timed on ``images``; the counts and
    confluence of each compared frame by frame with the first's. INT8 rows run ``int8_model``
    (a ``cellseg quantize`` output) and are left out without one."""
    from cellseg.edge.bundles.engine_select import open_engine, pipeline_for
    from cellseg.edge.errors import CellsegError

    frames = [Frame(read_image(p), source=str(p)) for p in images]
    rows: list[Comparison] = []
    reference: list[tuple[int, float]] | None = None
    for backend, precision, quantised in CANDIDATES:
        if quantised and int8_model is None:
            continue
        path = int8_model if quantised and int8_model is not None else model
        row = Comparison(backend, "int8" if quantised else precision, path.name)
        rows.append(row)
        try:
            opened = open_engine(path, backend, threads, compute=precision)
        except CellsegError as e:
            row.unavailable = str(e)
            continue
        try:
            pipeline = pipeline_for(opened)
            measured = [(m.count, m.confluence_pct) for m in (pipeline(f).measurement for f in frames)]
            row.report = run_bench(opened.engine, images, runs=runs, pipeline=pipeline, engine_alone=False)
        finally:
            opened.engine.close()
        if reference is None:
            reference = measured
        row.max_count_diff = max(abs(a[0] - b[0]) for a, b in zip(measured, reference, strict=True))
        row.mean_confluence_diff_pp = statistics.fmean(
            abs(a[1] - b[1]) for a, b in zip(measured, reference, strict=True)
        )
        first = rows[0].report
        row.ratio = row.report.images_per_s / first.images_per_s if first is not None else 0.0
    return rows


def format_comparison(rows: list[Comparison]) -> str:
    gated = any(r.verdict for r in rows)
    head = (f"{'backend':<12}{'precision':>10}{'images/s':>10}{'ms/image':>10}{'ratio':>8}"
            f"{'max |Δcount|':>14}{'mean |Δconfl.| pp':>19}") + (f"  {'gate':<22}" if gated else "")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.report is None:
            lines.append(f"{r.backend:<12}{r.precision:>10}  not here: {r.unavailable}")
            continue
        lines.append(f"{r.backend:<12}{r.report.precision:>10}{r.report.images_per_s:>10.2f}{r.report.ms_per_image:>10.1f}"
                     f"{r.ratio:>8.2f}{r.max_count_diff:>14d}{r.mean_confluence_diff_pp:>19.3f}"
                     + (f"  {r.verdict:<22}" if gated else ""))  # fmt: skip
    first = next((r.report for r in rows if r.report is not None), None)
    if first is not None:
        models = ", ".join(dict.fromkeys(r.model for r in rows if r.model))
        lines.append(f"\n{first.frames} frames x {first.runs} runs on {first.device} ({models}); ratio and "
                     f"differences against the first row")  # fmt: skip
    return "\n".join(lines)
