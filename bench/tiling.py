"""Tiled against untiled inference on real frames larger than the training frames, with the truth.

Frames: every 2x2 mosaic of four of the five Usiigaci validation frames (2048x2044 px at the
training pixel size, their label images joined the same way), and each validation frame upscaled
3x (a camera with pixels three times finer; given its pixel size, auto mode does not tile it).

    python bench/tiling.py [--model models/cellseg-usiigaci-yolo11n-seg.onnx] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import cv2
import numpy as np

from cellseg.edge.bundles.engine_select import open_engine
from cellseg.edge.capture.imageio import read_image
from cellseg.edge.pipeline.contract import Pipeline
from cellseg.edge.pipeline.host import HostPipeline
from cellseg.edge.pipeline.tiling import TiledPipeline, TileSettings
from cellseg.edge.pipeline.types import Frame

REPO = Path(__file__).resolve().parents[1]
VAL = range(46, 51)


def _val(data: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for s in VAL:
        folder = data / "usiigaci" / "val" / f"set{s}"
        label = cv2.imread(str(folder / "instances_ids.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
        out[s] = (read_image(folder / "raw.tif"), label)
    return out


def _truth(label: np.ndarray) -> tuple[int, float]:
    return len(np.unique(label)) - 1, 100.0 * float((label > 0).mean())


def _timed(pipeline: Pipeline, image: np.ndarray) -> tuple[int, float, float]:
    start = time.perf_counter()
    m = pipeline(Frame(image)).measurement
    return m.count, m.confluence_pct, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "cellseg-usiigaci-yolo11n-seg.onnx")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    opened = open_engine(args.model, "onnxruntime", threads=args.threads)
    host = HostPipeline(opened.engine)
    info = opened.engine.info
    val = _val(args.data)
    head = f"{'frame':<28}{'truth':>13} | {'untiled':>22} | {'tiled':>22}"
    print(head + "\n" + "-" * len(head))
    errors: dict[str, list[float]] = {"untiled": [], "tiled": []}
    for sets in itertools.combinations(VAL, 4):
        images = [val[s][0] for s in sets]
        labels = [np.where(val[s][1] > 0, val[s][1] + 1000 * k, 0) for k, s in enumerate(sets)]
        image = np.vstack([np.hstack(images[:2]), np.hstack(images[2:])])
        count, confluence = _truth(np.vstack([np.hstack(labels[:2]), np.hstack(labels[2:])]))
        settings = TileSettings.resolve("auto", info)
        a = _timed(host, image)
        b = _timed(TiledPipeline(host, settings), image) if settings else a
        for name, r in (("untiled", a), ("tiled", b)):
            errors[name].append(100 * abs(r[0] - count) / count)
        print(f"{'mosaic ' + '+'.join(map(str, sets)):<28}{count:>5} {confluence:>6.2f} % | "
              f"{a[0]:>5} {a[1]:>6.2f} % {a[2]:>6.2f} s | {b[0]:>5} {b[1]:>6.2f} % {b[2]:>6.2f} s")  # fmt: skip
    for s in VAL:
        image, label = val[s]
        count, confluence = _truth(label)
        big = cv2.resize(image, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
        native = _timed(host, image)
        fine = TileSettings.resolve("auto", info, pixel_size_um=(info.trained_pixel_um or 1.0) / 3)
        auto = _timed(TiledPipeline(host, fine), big) if fine else _timed(host, big)
        forced = _timed(TiledPipeline(host, TileSettings("on", info.trained_frame_px or 1024, 256)), big)
        print(f"{f'set{s} native':<28}{count:>5} {confluence:>6.2f} % | {native[0]:>5} {native[1]:>6.2f} % "
              f"{native[2]:>6.2f} s |")  # fmt: skip
        print(f"{f'set{s} 3x, auto (untiled)':<28}{'':>13} | {auto[0]:>5} {auto[1]:>6.2f} % {auto[2]:>6.2f} s | "
              f"{forced[0]:>5} {forced[1]:>6.2f} % {forced[2]:>6.2f} s  (tiled at 1024 anyway)")  # fmt: skip
    print(
        f"\nmosaics, count error vs truth: untiled {np.mean(errors['untiled']):.1f} %, "
        f"tiled {np.mean(errors['tiled']):.1f} % (mean of {len(errors['tiled'])})"
    )
    opened.engine.close()


if __name__ == "__main__":
    main()
