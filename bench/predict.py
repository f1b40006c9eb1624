"""Benchmark: cellseg's CPU pipeline against ultralytics' own predict on the same ONNX model.

Real 16-bit 1024x1022 Usiigaci val frames, read from disk each time. Both pipelines get the
same 8-bit frame (decoded and mapped by cellseg, time reported separately) and produce masks
at the frame's resolution (ultralytics with ``retina_masks=True``); cellseg also measures
count, confluence and areas. Per-stage medians in ms, and end-to-end images/s over all runs.

    python bench/predict.py [--model M.onnx] [--runs 5] [--conf 0.25 0.1 0.001] [--threads N]

Prints a table; makes no assertion (speed targets are read off this table, never tested).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# As the cellseg command does (see cellseg.cli._single_threaded_blas): BLAS threads only slow
# down the small per-cell products of the mask assembly. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cellseg.edge.bundles.shipped import default_model  # noqa: E402  (after the BLAS setting above)

DEFAULT_MODEL = default_model()
DEFAULT_DATA = Path(os.environ.get("CELLSEG_DATA", REPO.parent / "shared" / "data"))


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def bench_cellseg(model: Path, frames: list[Path], conf: float, runs: int, threads: int | None) -> dict[str, Any]:
    from cellseg.edge.capture.imageio import read_image
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
    from cellseg.edge.pipeline.host import HostPipeline
    from cellseg.edge.pipeline.postprocess import PostprocessConfig
    from cellseg.edge.pipeline.types import Frame

    rows, counts = [], []
    with OnnxRuntimeEngine(model, threads=threads) as engine:
        engine.warmup(2)
        predictor = HostPipeline(engine, PostprocessConfig(conf=conf, iou=0.7, max_det=1000))
        start = time.perf_counter()
        for _ in range(runs):
            for path in frames:
                t0 = time.perf_counter()
                pixels = read_image(path)
                decode = (time.perf_counter() - t0) * 1e3
                m = predictor(Frame(pixels, source=str(path)), {"decode": decode}).measurement
                rows.append(m.latencies_ms)
                counts.append(m.count)
        wall = time.perf_counter() - start
    return {"rows": rows, "images_per_s": len(rows) / wall, "count": statistics.median(counts)}


def bench_ultralytics(
    model: Path, frames: list[Path], conf: float, runs: int, *, retina: bool, settings: Path
) -> dict[str, Any]:
    import cv2

    from cellseg.edge.capture.imageio import read_image
    from cellseg.edge.pipeline.intensity import to_uint8
    from cellseg.training.offline import import_ultralytics_offline

    ultralytics = import_ultralytics_offline(settings)
    yolo = ultralytics.YOLO(str(model), task="segment")
    warm = cv2.cvtColor(to_uint8(read_image(frames[0])), cv2.COLOR_GRAY2BGR)
    for _ in range(2):
        yolo.predict(warm, conf=conf, iou=0.7, max_det=1000, retina_masks=retina, verbose=False)
    rows, counts = [], []
    start = time.perf_counter()
    for _ in range(runs):
        for path in frames:
            t0 = time.perf_counter()
            image = cv2.cvtColor(to_uint8(read_image(path)), cv2.COLOR_GRAY2BGR)
            decode = (time.perf_counter() - t0) * 1e3
            result = yolo.predict(image, conf=conf, iou=0.7, max_det=1000, retina_masks=retina, verbose=False)[0]
            speed = result.speed
            rows.append({"decode": decode, "preprocess": speed["preprocess"], "infer": speed["inference"],
                         "postprocess": speed["postprocess"], "measure": 0.0})  # fmt: skip
            counts.append(len(result.boxes))
    wall = time.perf_counter() - start
    return {"rows": rows, "images_per_s": len(rows) / wall, "count": statistics.median(counts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=5, help="passes over the frames")
    parser.add_argument("--conf", type=float, nargs="+", default=[0.25, 0.1, 0.001])
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for cellseg (default: all)")
    parser.add_argument("--no-ultralytics", action="store_true")
    args = parser.parse_args()

    frames = sorted((args.data / "usiigaci" / "val").glob("set*/raw.tif"))
    if not frames:
        print(f"no frames under {args.data}/usiigaci/val: set --data or CELLSEG_DATA", file=sys.stderr)
        return 2
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"model {args.model.name}; {len(frames)} frames x {args.runs} runs; {machine}")
    stages = ("decode", "preprocess", "infer", "postprocess", "measure")
    header = f"{'pipeline':<14}{'conf':>6}{'cells':>7}" + "".join(f"{s:>12}" for s in stages)
    header += f"{'pre+post':>10}{'% of inf':>10}{'non-inf':>9}{'img/s':>8}"
    print(header)
    print("-" * len(header))
    # ultralytics' settings for this run, removed with it.
    with tempfile.TemporaryDirectory(prefix="bench-ultralytics-") as tmp:
        settings = Path(tmp)
        for conf in args.conf:
            results = {"cellseg": bench_cellseg(args.model, frames, conf, args.runs, args.threads)}
            if not args.no_ultralytics:
                # retina: masks at the frame's resolution, the same output as cellseg's; default:
                # ultralytics' default predict, masks at the 640x640 input resolution only.
                results["ultra-retina"] = bench_ultralytics(
                    args.model, frames, conf, args.runs, retina=True, settings=settings
                )
                results["ultra-default"] = bench_ultralytics(
                    args.model, frames, conf, args.runs, retina=False, settings=settings
                )
            for name, res in results.items():
                med = {s: _median(res["rows"], s) for s in stages}
                pre_post = med["preprocess"] + med["postprocess"]
                non_inf = med["preprocess"] + med["postprocess"] + med["measure"]
                cells = f"{name:<14}{conf:>6}{res['count']:>7.0f}" + "".join(f"{med[s]:>12.2f}" for s in stages)
                share = 100 * pre_post / med["infer"]
                print(f"{cells}{pre_post:>10.2f}{share:>9.1f}%{non_inf:>9.2f}{res['images_per_s']:>8.2f}")
    print("times: median ms per frame; pre+post: preprocess + postprocess; non-inf: everything but decode and "
          "inference; img/s: end to end including decode")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
