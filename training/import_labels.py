"""Import instance label images (0 = background, 1..N = one id per object) into YOLO-seg.

Two source layouts are recognised, per split folder (``train/``, ``val/``, ``test/``):

    <split>/<sample>/<image>  and  <split>/<sample>/<label>       (one folder per sample, Usiigaci)
    <split>/images/<stem>.*   and  <split>/labels/<stem>.*        (paired folders)

Frames of any bit depth are mapped to 8 bits by :func:`cellseg.edge.pipeline.intensity.to_uint8`, the same
function the device applies, so training and inference see the same intensities.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from cellseg.edge.capture.imageio import IMAGE_SUFFIXES, read_image
from cellseg.edge.errors import DatasetError, ImageReadError
from cellseg.edge.pipeline.intensity import IntensityMapping, to_uint8
from cellseg.training.yolo_dataset import SPLITS, ImportSummary, Instance, YoloSegWriter


@dataclass(frozen=True)
class LabelPair:
    split: str
    name: str
    image: Path
    label: Path


def find_pairs(source: Path, image_name: str = "raw.tif", label_name: str = "instances_ids.png") -> list[LabelPair]:
    """Find (image, label image) pairs under ``source``, in a stable order."""
    source = Path(source)
    if not source.is_dir():
        raise DatasetError(f"{source}: not a folder")
    pairs: list[LabelPair] = []
    for split in SPLITS:
        split_dir = source / split
        if split_dir.is_dir():
            pairs.extend(_pairs_in_split(split, split_dir, image_name, label_name))
    if not pairs:
        raise DatasetError(
            f"{source}: found no image/label pairs; expected {'|'.join(SPLITS)}/<sample>/{image_name} with "
            f"{label_name}, or {'|'.join(SPLITS)}/images/ with {'|'.join(SPLITS)}/labels/"
        )
    return pairs


def _pairs_in_split(split: str, split_dir: Path, image_name: str, label_name: str) -> Iterator[LabelPair]:
    images_dir, labels_dir = split_dir / "images", split_dir / "labels"
    if images_dir.is_dir() and labels_dir.is_dir():
        labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        for image in sorted(images_dir.iterdir()):
            if image.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if image.stem not in labels:
                raise DatasetError(f"{image}: no label image {labels_dir / image.stem}.* for it")
            yield LabelPair(split, image.stem, image, labels[image.stem])
        return
    for sample in sorted((d for d in split_dir.iterdir() if d.is_dir()), key=_natural_key):
        image, label = sample / image_name, sample / label_name
        if not image.is_file() and not label.is_file():
            continue
        if not image.is_file():
            raise DatasetError(f"{sample}: has {label_name} but no image {image_name}")
        if not label.is_file():
            raise DatasetError(f"{sample}: has {image_name} but no label image {label_name}")
        yield LabelPair(split, sample.name, image, label)


def _natural_key(path: Path) -> tuple[str, int]:
    stem = path.name.rstrip("0123456789")
    digits = path.name[len(stem) :]
    return stem, int(digits) if digits else -1


def instances_from_label_image(
    label: npt.NDArray[np.integer], source: object = "label image"
) -> tuple[list[Instance], list[str]]:
    """Polygons of each labelled object, with warnings for objects that had to be simplified.

    Objects split into several pieces keep their largest piece (a YOLO-seg label holds one
    polygon per instance); objects too thin for a contour are kept as their bounding box, so
    the instance count always equals the number of ids. Both cases are reported.
    """
    if label.ndim != 2:
        raise DatasetError(f"{source}: label image must be single-channel, got shape {label.shape}")
    instances: list[Instance] = []
    warnings: list[str] = []
    ids = np.unique(label)
    ids = ids[ids != 0]
    # One bounding-box slice per id keeps this linear in the image size, not ids x image size.
    objects = _object_slices(label, ids)
    for obj_id, (rows, cols) in zip(ids.tolist(), objects, strict=True):
        crop = (label[rows, cols] == obj_id).astype(np.uint8)
        area = int(crop.sum())
        polygon, parts = polygon_from_mask(crop)
        offset = np.array([cols.start, rows.start], dtype=np.float64)
        if polygon is None:
            # A speck or a one-pixel-wide line has no contour with an area; its bounding
            # rectangle (pixel edges, not centres) keeps it in the count with its true extent.
            warnings.append(f"{source}: object {obj_id} ({area} px) is too thin for a contour; kept as its box")
            h, w = crop.shape
            polygon = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64) - 0.5
        elif parts > 1:
            warnings.append(f"{source}: object {obj_id} has {parts} separate parts; kept the largest")
        instances.append(Instance(polygon + offset, 0, float(area)))
    return instances, warnings


def polygon_from_mask(mask: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float64] | None, int]:
    """Outline of a binary mask as a ``(K, 2)`` polygon through boundary pixel centres.

    Returns the largest part's polygon (``None`` when no part has an area) and the number of parts.
    """
    import cv2

    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = [c for c in contours if len(c) >= 3 and cv2.contourArea(c) > 0]
    if not contours:
        return None, 0
    contour = max(contours, key=cv2.contourArea)
    return contour.reshape(-1, 2).astype(np.float64), len(contours)


def _object_slices(label: npt.NDArray[np.integer], ids: npt.NDArray[np.integer]) -> list[tuple[slice, slice]]:
    ys, xs = np.nonzero(label)
    values = label[ys, xs]
    order = np.argsort(values, kind="stable")
    values, ys, xs = values[order], ys[order], xs[order]
    starts = np.searchsorted(values, ids, side="left")
    ends = np.searchsorted(values, ids, side="right")
    return [
        (slice(int(ys[s:e].min()), int(ys[s:e].max()) + 1), slice(int(xs[s:e].min()), int(xs[s:e].max()) + 1))
        for s, e in zip(starts, ends, strict=True)
    ]


def import_label_images(
    source: Path,
    output: Path,
    *,
    class_name: str = "cell",
    image_name: str = "raw.tif",
    label_name: str = "instances_ids.png",
    mapping: IntensityMapping | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportSummary:
    """Convert a folder of frames with instance label images into a YOLO-seg dataset."""
    pairs = find_pairs(source, image_name, label_name)
    writer = YoloSegWriter(Path(output), [class_name], overwrite=overwrite)
    for pair in tqdm(pairs, desc="importing", unit="image", disable=not progress):
        image = read_image(pair.image)
        try:
            label = read_image(pair.label)
        except ImageReadError as e:
            raise DatasetError(f"label image {e}") from e
        if label.ndim != 2:
            raise DatasetError(f"{pair.label}: label image must be single-channel, got shape {label.shape}")
        if label.shape != image.shape[:2]:
            raise DatasetError(
                f"{pair.label}: label image is {label.shape[1]}x{label.shape[0]} but its frame "
                f"{pair.image} is {image.shape[1]}x{image.shape[0]}"
            )
        instances, warnings = instances_from_label_image(label, pair.label)
        writer.summary.warnings.extend(warnings)
        writer.write(pair.split, pair.name, to_uint8(image, mapping), instances)
    return writer.finish(source=f"label images from {source}")
