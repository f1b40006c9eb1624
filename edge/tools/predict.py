"""``cellseg predict``: count cells and measure confluence in image files.

Images, folders and glob patterns; 8- and 16-bit TIFF, PNG and JPEG. Per image a text line,
or a JSON object (``--json``) or CSV row (``--csv``); optionally overlay pictures and
instance label images. An unreadable image gets an error line naming it and the run goes on.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from cellseg.edge.capture.acquisition import Acquired, acquisition_time
from cellseg.edge.capture.files import file_frame
from cellseg.edge.capture.imageio import IMAGE_SUFFIXES, read_image
from cellseg.edge.errors import CellsegError, DependencyError, ImageReadError
from cellseg.edge.pipeline.tiling import TileMode, TileSettings, with_tiling
from cellseg.edge.service.contract import measurement_payload

logger = logging.getLogger(__name__)

CSV_FIELDS = (
    "image",
    "acquired_at",
    "time_utc",
    "count",
    "confluence_pct",
    "mean_area_px",
    "median_area_px",
    "mean_area_um2",
    "median_area_um2",
    "width",
    "height",
    "decode_ms",
    "preprocess_ms",
    "infer_ms",
    "postprocess_ms",
    "measure_ms",
)


@dataclass
class PredictOptions:
    output_format: str = "text"  # text | json | csv
    overlay_dir: Path | None = None
    labels_dir: Path | None = None
    labels_format: str = "png"  # png | tif
    conf: float | None = None
    iou: float | None = None
    max_det: int | None = None
    pixel_size_um: float | None = None
    threads: int | None = None
    acquired: Callable[[Path], Acquired] = acquisition_time  # when each image was taken
    backend: str = "auto"  # a backend of the table, or auto (ONNX Runtime for an ONNX model)
    precision: str = "fp32"  # the float precision, where the backend has a choice
    tile: TileMode = "auto"  # see cellseg.edge.pipeline.tiling
    tile_px: int | None = None
    overlap_px: int | None = None


def expand_inputs(inputs: Sequence[str]) -> Iterator[Path]:
    """Files, folders (their images, sorted) and glob patterns, in the order given.

    A name that matches nothing is still yielded, so that it gets its own error line.
    """
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                yield path
            yield from (m for m in matches if m.is_file())
        else:
            yield path


def _unique_stem(path: Path, used: set[str]) -> str:
    stem = path.stem
    candidate, k = stem, 1
    while candidate in used:
        k += 1
        candidate = f"{stem}_{k}"
    used.add(candidate)
    return candidate


def run_predict(model: Path, inputs: Sequence[str], options: PredictOptions, out: IO[str] | None = None) -> int:
    """Writes one line (or row) per image to ``out`` (default: standard output); returns the
    number of images that failed (0: all succeeded)."""
    out = out or sys.stdout
    import cv2

    from cellseg.edge.bundles.engine_select import open_engine
    from cellseg.edge.engines.registry import PipelineSettings
    from cellseg.edge.pipeline.overlay import draw_overlay

    opened = open_engine(model, options.backend, options.threads, compute=options.precision)
    engine = opened.engine
    try:
        config = engine.info.thresholds.overridden(conf=options.conf, iou=options.iou, max_det=options.max_det)
        tiles = TileSettings.resolve(options.tile, engine.info, tile_px=options.tile_px,
                                     overlap_px=options.overlap_px, pixel_size_um=options.pixel_size_um)  # fmt: skip
        predictor = with_tiling(
            opened.backend.pipeline(engine, PipelineSettings(config, options.pixel_size_um)), tiles,
            options.pixel_size_um,
        )  # fmt: skip
        want_masks = options.overlay_dir is not None or options.labels_dir is not None  # else they may stay on a GPU
        for folder in (options.overlay_dir, options.labels_dir):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS) if options.output_format == "csv" else None
        if writer:
            writer.writeheader()
        failures, used_stems = 0, set[str]()
        for seq, path in enumerate(expand_inputs(inputs)):
            t0 = time.perf_counter()
            try:
                pixels = read_image(path)
            except ImageReadError as e:
                failures += 1
                _error_line(out, options.output_format, str(path), e.reason)
                continue
            decode_ms = (time.perf_counter() - t0) * 1e3
            frame = file_frame(pixels, path, seq, options.acquired)
            try:
                result = predictor(frame, want_masks=want_masks)
            except CellsegError as e:
                failures += 1
                _error_line(out, options.output_format, str(path), str(e))
                continue
            m = replace(result.measurement, latencies_ms={"decode": decode_ms, **result.measurement.latencies_ms})
            stem = _unique_stem(path, used_stems)
            if options.overlay_dir is not None:
                cv2.imwrite(
                    str(options.overlay_dir / f"{stem}.png"),
                    draw_overlay(frame, result.detections, m, engine.info.mapping),
                )
            if options.labels_dir is not None:
                suffix = ".tif" if options.labels_format == "tif" else ".png"
                write_labels(options.labels_dir / f"{stem}{suffix}", result.detections.label_image(), m.pixel_size_um)
            _result_line(out, options.output_format, writer, measurement_payload(m))
        return failures
    finally:
        engine.close()


def write_labels(path: Path, labels: Any, pixel_size_um: float | None) -> None:
    """A 16-bit instance label image as the project itself reads it back: PNG, or a TIFF that
    tifffile writes zlib-compressed (OpenCV's default LZW needs ``imagecodecs`` to be read by
    tifffile) in ImageJ's layout, with the pixel size as its resolution in µm when known, as
    Fiji shows it."""
    import cv2

    if path.suffix.lower() != ".tif":
        if not cv2.imwrite(str(path), labels):
            raise CellsegError(f"{path}: OpenCV could not write the label image")
        return
    try:
        import tifffile
    except ImportError as e:
        raise DependencyError("tifffile", "edge", "label images as TIFF") from e
    extra: dict[str, Any] = {}
    if pixel_size_um is not None:
        extra = {"resolution": (1.0 / pixel_size_um, 1.0 / pixel_size_um), "metadata": {"unit": "um"}}
    tifffile.imwrite(path, labels, compression="zlib", imagej=True, **extra)


def _time_utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"


def _result_line(out: IO[str], fmt: str, writer: csv.DictWriter[str] | None, d: dict[str, Any]) -> None:
    areas = d["areas"]
    if fmt == "json":
        out.write(json.dumps(d) + "\n")
    elif writer is not None:
        lat = d["latencies_ms"]
        writer.writerow(
            {
                "image": d["image"],
                "acquired_at": d["acquired_at"] or "",
                "time_utc": _time_utc(d["timestamp"]),
                "count": d["count"],
                "confluence_pct": d["confluence_pct"],
                "mean_area_px": round(areas["mean_px"], 1),
                "median_area_px": round(areas["median_px"], 1),
                "mean_area_um2": round(areas["mean_um2"], 2) if "mean_um2" in areas else "",
                "median_area_um2": round(areas["median_um2"], 2) if "median_um2" in areas else "",
                "width": d["width"],
                "height": d["height"],
                **{f"{k}_ms": lat.get(k, "") for k in ("decode", "preprocess", "infer", "postprocess", "measure")},
            }
        )
    else:
        lat = d["latencies_ms"]
        um2 = f" ({areas['median_um2']:.0f} µm²)" if "median_um2" in areas else ""
        out.write(
            f"{d['image']}: {d['count']} cells, confluence {d['confluence_pct']:.2f}%, "
            f"median area {areas['median_px']:.0f} px{um2}  "
            f"({lat.get('infer', 0):.0f} ms inference, {sum(lat.values()):.0f} ms total)\n"
        )
    out.flush()


def _error_line(out: IO[str], fmt: str, image: str, reason: str) -> None:
    logger.error("%s: %s", image, reason)
    if fmt == "json":
        out.write(json.dumps({"image": image, "error": reason}) + "\n")
    elif fmt == "text":
        out.write(f"{image}: ERROR {reason}\n")
    # CSV keeps its rows uniform; the error went to the log (stderr).
    out.flush()
