"""Writing an ultralytics YOLO-seg dataset, and the summary of what an import produced.

Layout (what ultralytics expects, with ``data.yaml`` at the root):

    data.yaml              names, and train/val/test image folders relative to this file
    images/<split>/*.png   8-bit images (16-bit sources already mapped by edge.intensity)
    labels/<split>/*.txt   one line per instance: ``class x1 y1 x2 y2 ...`` normalised to [0, 1]

``data.yaml`` carries no absolute ``path``: ultralytics falls back to the folder holding the
yaml, so a dataset can be moved or copied to another machine as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from cellseg.edge.config import read_yaml
from cellseg.edge.errors import DatasetError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Instance:
    """One annotated object: a closed polygon in pixel coordinates of its image.

    Attributes:
        polygon: ``(K, 2)`` float array of (x, y) vertices, K >= 3.
        class_id: index into the dataset's class names.
        area: the annotation's pixel area (from the mask when known, else the polygon's).
    """

    polygon: npt.NDArray[np.float64]
    class_id: int
    area: float


@dataclass(frozen=True)
class ImportedImage:
    """One image written to the dataset, with its instances."""

    split: str
    name: str
    width: int
    height: int
    instances: Sequence[Instance]


@dataclass
class ImportSummary:
    """What an import wrote, for the user to check before training on it."""

    root: Path
    class_names: list[str]
    images: dict[str, int] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    areas: list[float] = field(default_factory=list)
    per_image: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, image: ImportedImage) -> None:
        self.images[image.split] = self.images.get(image.split, 0) + 1
        self.instances[image.split] = self.instances.get(image.split, 0) + len(image.instances)
        self.per_image.append(len(image.instances))
        self.areas.extend(inst.area for inst in image.instances)

    def to_dict(self) -> dict[str, Any]:
        areas = np.asarray(self.areas, dtype=np.float64)
        per_image = np.asarray(self.per_image, dtype=np.float64)

        def stats(values: npt.NDArray[np.float64]) -> dict[str, float]:
            if values.size == 0:
                return {}
            q = np.percentile(values, [0, 5, 50, 95, 100])
            return {
                "min": float(q[0]),
                "p5": float(q[1]),
                "median": float(q[2]),
                "p95": float(q[3]),
                "max": float(q[4]),
                "mean": float(values.mean()),
            }

        return {
            "root": str(self.root),
            "class_names": self.class_names,
            "images": self.images,
            "instances": self.instances,
            "instances_per_image": stats(per_image),
            "instance_area_px": stats(areas),
            "warnings": self.warnings,
        }

    def format(self) -> str:
        d = self.to_dict()
        lines = [f"dataset written to {self.root}", f"classes: {', '.join(self.class_names)}"]
        for split in SPLITS:
            if split in self.images:
                lines.append(
                    f"  {split:<5}  {self.images[split]:5d} images  {self.instances.get(split, 0):7d} instances"
                )
        for key, label in (("instances_per_image", "instances/image"), ("instance_area_px", "area (px)")):
            s = d[key]
            if s:
                lines.append(
                    f"  {label:<16} min {s['min']:.0f}  p5 {s['p5']:.0f}  median {s['median']:.0f}  "
                    f"p95 {s['p95']:.0f}  max {s['max']:.0f}  mean {s['mean']:.1f}"
                )
        if self.warnings:
            lines.append(f"  {len(self.warnings)} warning(s):")
            lines.extend(f"    - {w}" for w in self.warnings[:20])
            if len(self.warnings) > 20:
                lines.append(f"    ... and {len(self.warnings) - 20} more (see summary.json)")
        return "\n".join(lines)


class YoloSegWriter:
    """Writes images and polygon labels into a YOLO-seg dataset folder."""

    def __init__(self, root: Path, class_names: Sequence[str], overwrite: bool = False) -> None:
        if not class_names:
            raise DatasetError("a dataset needs at least one class name")
        self.root = Path(root)
        if (self.root / "data.yaml").exists() and not overwrite:
            raise DatasetError(f"{self.root} already holds a dataset (data.yaml); pass --overwrite to replace it")
        self.summary = ImportSummary(root=self.root, class_names=list(class_names))

    def write(self, split: str, name: str, image: npt.NDArray[np.uint8], instances: Sequence[Instance]) -> None:
        """Write one 8-bit image and its label file. ``name`` is the file stem, unique per split."""
        import cv2

        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
        if image.dtype != np.uint8:
            raise DatasetError(f"{name}: dataset images must be 8-bit, got {image.dtype}")
        height, width = image.shape[:2]
        img_dir = self.root / "images" / split
        lbl_dir = self.root / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(img_dir / f"{name}.png"), image):
            raise DatasetError(f"could not write {img_dir / (name + '.png')}")
        lines = []
        for inst in instances:
            norm = inst.polygon / np.array([width, height], dtype=np.float64)
            coords = " ".join(f"{v:.6f}" for v in np.clip(norm, 0.0, 1.0).reshape(-1))
            lines.append(f"{inst.class_id} {coords}")
        (lbl_dir / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        self.summary.add(ImportedImage(split, name, width, height, instances))

    def finish(self, source: str) -> ImportSummary:
        """Write ``data.yaml`` and ``summary.json``; call once after the last image."""
        splits = [s for s in SPLITS if self.summary.images.get(s)]
        if "train" not in splits:
            raise DatasetError("the import produced no training images")
        data: dict[str, Any] = {s: f"images/{s}" for s in splits}
        if "val" not in data:
            # ultralytics needs a val split; validating on train is better than failing.
            data["val"] = "images/train"
            self.summary.warnings.append("no validation split: val points at train")
        data["names"] = dict(enumerate(self.summary.class_names))
        data["source"] = source
        with open(self.root / "data.yaml", "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        (self.root / "summary.json").write_text(json.dumps(self.summary.to_dict(), indent=2))
        return self.summary


def load_data_yaml(path: Path) -> dict[str, Any]:
    """Read a dataset's ``data.yaml`` and resolve its split folders to absolute paths."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    data = read_yaml(path, DatasetError)
    if not isinstance(data, dict) or "names" not in data or "train" not in data:
        raise DatasetError(f"{path}: not a YOLO dataset file (needs 'names' and 'train')")
    # A relative 'path' is relative to the yaml's folder; without one, the folder itself.
    base = path.parent / data["path"] if data.get("path") else path.parent
    data["path"] = str(base.resolve())
    names = data["names"]
    data["names"] = list(names.values()) if isinstance(names, dict) else list(names)
    return data


def dataset_hash(root: Path, splits: Iterable[str] = SPLITS) -> str:
    """sha256 over every image and label file of the given splits, in a fixed order."""
    h = hashlib.sha256()
    root = Path(root)
    for split in splits:
        for sub in ("images", "labels"):
            folder = root / sub / split
            if not folder.is_dir():
                continue
            for file in sorted(folder.iterdir()):
                if file.is_file():
                    h.update(f"{sub}/{split}/{file.name}\0".encode())
                    h.update(hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()


def read_label_file(path: Path, width: int, height: int) -> list[Instance]:
    """Read a YOLO-seg label file back into pixel-space polygons."""
    instances = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 7 or len(parts) % 2 == 0:
            raise DatasetError(f"{path}:{lineno}: expected 'class x y x y x y ...' with >= 3 points")
        try:
            values = np.array([float(v) for v in parts[1:]], dtype=np.float64).reshape(-1, 2)
            class_id = int(parts[0])
        except ValueError as e:
            raise DatasetError(f"{path}:{lineno}: non-numeric value: {e}") from e
        polygon = values * np.array([width, height], dtype=np.float64)
        instances.append(Instance(polygon, class_id, polygon_area(polygon)))
    return instances


def polygon_area(polygon: npt.NDArray[np.float64]) -> float:
    """Shoelace area of a ``(K, 2)`` polygon."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
