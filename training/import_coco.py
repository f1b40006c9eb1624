"""Import a Roboflow COCO segmentation export into a YOLO-seg dataset.

Roboflow's layout: ``train/``, ``valid/`` and ``test/`` folders, each with
``_annotations.coco.json`` and the images it names. Segmentations may be polygons
(``[[x1, y1, x2, y2, ...], ...]``) or RLE (``{"size": [h, w], "counts": ...}``, compressed or
not). Roboflow adds a placeholder category (id 0, the project name) that is the supercategory
of the real classes and has no annotations; it is dropped.

Problems are errors that name the file and the annotation id (``--skip-invalid`` turns each
bad annotation into a warning in the summary instead).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.errors import DatasetError, ImageReadError
from cellseg.edge.pipeline.intensity import IntensityMapping, to_uint8
from cellseg.training.import_labels import polygon_from_mask
from cellseg.training.yolo_dataset import ImportSummary, Instance, YoloSegWriter, polygon_area

ANNOTATIONS_FILE = "_annotations.coco.json"
ROBOFLOW_SPLITS = {"train": "train", "valid": "val", "val": "val", "test": "test"}
OUT_OF_BOUNDS_TOLERANCE_PX = 1.0  # annotation tools round outlines outwards by up to a pixel


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a text file: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a COCO object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or malformed '{key}' list")
    return data


def class_map(categories: list[dict[str, Any]], used_ids: set[int], source: Path) -> tuple[dict[int, int], list[str]]:
    """COCO category id -> contiguous class index, dropping Roboflow's unused placeholder."""
    try:
        by_id = {int(c["id"]): str(c["name"]) for c in categories}
        supers = {str(c.get("supercategory", "")) for c in categories}
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{source}: malformed category entry: {e}") from e
    keep = [cid for cid in sorted(by_id) if cid in used_ids or by_id[cid] not in supers]
    if not keep:
        raise DatasetError(f"{source}: no categories")
    return {cid: i for i, cid in enumerate(keep)}, [by_id[cid] for cid in keep]


def decode_rle(rle: dict[str, Any]) -> npt.NDArray[np.uint8]:
    """Decode COCO RLE (uncompressed list of counts, or the compressed string form) to ``(h, w)``."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = _decode_compressed_counts(counts)
    flat = np.zeros(h * w, dtype=np.uint8)
    pos, value = 0, 0
    for count in counts:
        run = int(count)
        if run < 0 or pos + run > h * w:
            raise ValueError("RLE counts overrun the mask size")
        if value:
            flat[pos : pos + run] = 1
        pos += run
        value ^= 1
    # COCO RLE runs down columns (Fortran order).
    mask: npt.NDArray[np.uint8] = flat.reshape((w, h)).T.copy()
    return mask


def _decode_compressed_counts(text: str) -> list[int]:
    """pycocotools' string RLE: 5-bit groups with a continuation bit, deltas after the 3rd run."""
    counts: list[int] = []
    data = text.encode("ascii")
    i = 0
    while i < len(data):
        x, k, more = 0, 0, True
        while more:
            if i >= len(data):
                raise ValueError("truncated compressed RLE")
            c = data[i] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _instance(ann: dict[str, Any], width: int, height: int, cls: int) -> tuple[Instance, list[str]]:
    """One annotation as an Instance; raises ValueError with the reason when it is unusable."""
    seg = ann.get("segmentation")
    notes: list[str] = []
    if isinstance(seg, dict):
        if [int(v) for v in seg.get("size", [])] != [height, width]:
            raise ValueError(f"RLE size {seg.get('size')} differs from the image's [{height}, {width}]")
        mask = decode_rle(seg)
        polygon, parts = polygon_from_mask(mask)
        if polygon is None:
            raise ValueError("RLE mask is empty or has no area")
        if parts > 1:
            notes.append(f"{parts} separate parts; kept the largest")
        return Instance(polygon, cls, float(mask.sum())), notes
    if not isinstance(seg, list) or not seg:
        raise ValueError("no segmentation (expected a polygon list or RLE)")
    polygons = []
    for part in seg:
        if not isinstance(part, list) or len(part) < 6 or len(part) % 2:
            raise ValueError("degenerate polygon: needs an even number of coordinates and at least 3 points")
        try:
            poly = np.asarray(part, dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError) as e:
            raise ValueError(f"non-numeric polygon coordinates: {e}") from e
        if not np.isfinite(poly).all():
            raise ValueError("polygon has non-finite coordinates")
        tol = OUT_OF_BOUNDS_TOLERANCE_PX
        if poly.min() < -tol or poly[:, 0].max() > width + tol or poly[:, 1].max() > height + tol:
            raise ValueError(
                f"polygon out of bounds: x in [{poly[:, 0].min():.1f}, {poly[:, 0].max():.1f}], "
                f"y in [{poly[:, 1].min():.1f}, {poly[:, 1].max():.1f}] for a {width}x{height} image"
            )
        if polygon_area(poly) <= 0:
            raise ValueError("degenerate polygon: zero area")
        polygons.append(poly)
    if len(polygons) > 1:
        notes.append(f"{len(polygons)} polygons; kept the largest")
    largest = max(polygons, key=polygon_area)
    return Instance(largest, cls, polygon_area(largest)), notes


def import_coco(
    source: Path,
    output: Path,
    *,
    mapping: IntensityMapping | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportSummary:
    """Convert a Roboflow COCO export (``train/``, ``valid/``, ``test/``) into a YOLO-seg dataset."""
    source = Path(source)
    split_files = [
        (ROBOFLOW_SPLITS[d.name], d / ANNOTATIONS_FILE)
        for d in sorted(source.iterdir() if source.is_dir() else [])
        if d.name in ROBOFLOW_SPLITS and (d / ANNOTATIONS_FILE).is_file()
    ]
    if not split_files:
        raise DatasetError(
            f"{source}: no {{train,valid,test}}/{ANNOTATIONS_FILE} found; is this a Roboflow COCO export?"
        )
    loaded = [(split, path, _load_json(path)) for split, path in split_files]
    used = {int(a["category_id"]) for _, _, d in loaded for a in d["annotations"] if "category_id" in a}
    # Class indices must agree across splits, so they come from the union of categories.
    categories = {int(c["id"]): c for _, _, d in loaded for c in d["categories"] if "id" in c}
    cmap, names = class_map(list(categories.values()), used, split_files[0][1])

    writer: YoloSegWriter | None = None
    for split, ann_path, data in loaded:
        writer = writer or YoloSegWriter(Path(output), names, overwrite=overwrite)
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        image_ids = {int(im["id"]) for im in data["images"]}
        for ann in data["annotations"]:
            image_id = ann.get("image_id")
            if image_id not in image_ids:
                _problem(
                    writer, skip_invalid, f"{ann_path}: annotation {ann.get('id')} refers to unknown image {image_id}"
                )
                continue
            by_image[int(image_id)].append(ann)
        for im in tqdm(data["images"], desc=f"importing {split}", unit="image", disable=not progress):
            _import_image(
                writer,
                split=split,
                ann_path=ann_path,
                im=im,
                annotations=by_image[int(im["id"])],
                cmap=cmap,
                mapping=mapping,
                skip_invalid=skip_invalid,
            )
    if writer is None:
        raise DatasetError(f"{source}: nothing to import")
    return writer.finish(source=f"COCO export {source}")


def _import_image(
    writer: YoloSegWriter,
    *,
    split: str,
    ann_path: Path,
    im: dict[str, Any],
    annotations: list[dict[str, Any]],
    cmap: dict[int, int],
    mapping: IntensityMapping | None,
    skip_invalid: bool,
) -> None:
    file_name = str(im.get("file_name", ""))
    image_path = ann_path.parent / file_name
    try:
        pixels = read_image(image_path)
    except ImageReadError as e:
        raise DatasetError(f"{ann_path}: image {im.get('id')} ({file_name}): {e.reason}") from e
    height, width = pixels.shape[:2]
    if (im.get("width"), im.get("height")) not in ((width, height), (None, None)):
        raise DatasetError(
            f"{ann_path}: image {im.get('id')} ({file_name}) is {width}x{height} on disk but "
            f"{im.get('width')}x{im.get('height')} in the annotations"
        )
    instances = []
    for ann in annotations:
        where = f"{ann_path}: annotation {ann.get('id')} (image {file_name})"
        cat = ann.get("category_id")
        if cat not in cmap:
            _problem(writer, skip_invalid, f"{where}: unknown category {cat}")
            continue
        try:
            instance, notes = _instance(ann, width, height, cmap[int(cat)])
        except (ValueError, KeyError, TypeError) as e:
            _problem(writer, skip_invalid, f"{where}: {e}")
            continue
        writer.summary.warnings.extend(f"{where}: {n}" for n in notes)
        instances.append(instance)
    writer.write(split, Path(file_name).stem, to_uint8(pixels, mapping), instances)


def _problem(writer: YoloSegWriter, skip_invalid: bool, message: str) -> None:
    if not skip_invalid:
        raise DatasetError(message + " (use --skip-invalid to import the rest and list these as warnings)")
    writer.summary.warnings.append("skipped " + message)
