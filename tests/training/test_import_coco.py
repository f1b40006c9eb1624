"""COCO import round trip on a Roboflow-style export built from the real Usiigaci label images."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.errors import DatasetError
from cellseg.edge.pipeline.intensity import to_uint8
from cellseg.training.evaluate import ground_truth
from cellseg.training.import_coco import decode_rle, import_coco
from cellseg.training.metrics import Instances, mask_iou

# (Roboflow split folder, Usiigaci split, set)
SETS = [("train", "train", "set1"), ("train", "train", "set2"), ("valid", "val", "set46"), ("test", "val", "set47")]


def _objects(label: np.ndarray) -> dict[int, np.ndarray]:
    return {int(i): label == i for i in np.unique(label) if i != 0}


def _export(usiigaci: Path, root: Path) -> dict[str, Any]:
    """Write a Roboflow COCO export: polygons for even ids, compressed RLE for odd ids, one
    image with uncompressed RLE; Roboflow's placeholder category 0 as the supercategory."""
    truth: dict[str, Any] = {}
    ann_id = 1
    by_folder: dict[str, dict[str, Any]] = {}
    for folder, split, name in SETS:
        coco = by_folder.setdefault(
            folder,
            {
                "info": {"description": "cellseg test export"},
                "categories": [
                    {"id": 0, "name": "cells", "supercategory": "none"},
                    {"id": 1, "name": "cell", "supercategory": "cells"},
                ],
                "images": [],
                "annotations": [],
            },
        )
        (root / folder).mkdir(parents=True, exist_ok=True)
        image = to_uint8(read_image(usiigaci / split / name / "raw.tif"))
        file_name = f"{name}_png.rf.0123456789abcdef.png"
        cv2.imwrite(str(root / folder / file_name), image)
        h, w = image.shape
        image_id = len(coco["images"])
        coco["images"].append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        label = read_image(usiigaci / split / name / "instances_ids.png")
        objects = _objects(label)
        truth[name] = objects
        for obj_id, mask in objects.items():
            ann: dict[str, Any] = {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0}
            if obj_id % 2 == 0:
                contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                ann["segmentation"] = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
            else:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                if name == "set2":  # uncompressed form: a list of run lengths
                    ann["segmentation"] = {"size": [h, w], "counts": _uncompressed_counts(mask)}
                else:
                    ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode()}
            ann["area"] = float(mask.sum())
            coco["annotations"].append(ann)
            ann_id += 1
    for folder, coco in by_folder.items():
        (root / folder / "_annotations.coco.json").write_text(json.dumps(coco))
    return truth


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: alternating runs of 0s and 1s down the columns, 0s first."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


@pytest.fixture(scope="module")
def export(usiigaci: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("roboflow")
    return root, _export(usiigaci, root)


def test_uncompressed_rle_helper_matches_pycocotools(usiigaci: Path) -> None:
    label = read_image(usiigaci / "train" / "set2" / "instances_ids.png")
    mask = label == 5
    h, w = mask.shape
    np.testing.assert_array_equal(decode_rle({"size": [h, w], "counts": _uncompressed_counts(mask)}), mask)
    frpy = mask_utils.frPyObjects({"size": [h, w], "counts": _uncompressed_counts(mask)}, h, w)
    np.testing.assert_array_equal(mask_utils.decode(frpy).astype(bool), mask)


def test_round_trip_keeps_every_cell_and_its_outline(export: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, truth = export
    summary = import_coco(root, tmp_path / "ds", progress=False)
    assert summary.class_names == ["cell"]  # the placeholder category 0 is dropped
    assert summary.images == {"train": 2, "val": 1, "test": 1}
    for folder, _split, name in SETS:
        out_split = {"train": "train", "valid": "val", "test": "test"}[folder]
        stem = f"{name}_png.rf.0123456789abcdef"
        image = cv2.imread(str(tmp_path / "ds" / "images" / out_split / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        h, w = image.shape
        gt = ground_truth(tmp_path / "ds" / "labels" / out_split / f"{stem}.txt", w, h)
        objects = truth[name]
        assert len(gt) == len(objects), name
        # Each original cell is found again: best IoU of its imported outline >= 0.8
        # (multi-part cells keep their largest part).
        orig = Instances(
            boxes=np.zeros((len(objects), 4)),
            masks=[m for m in objects.values()],
            origins=np.zeros((len(objects), 2), dtype=np.int64),
            scores=np.ones(len(objects)),
            class_ids=np.zeros(len(objects), dtype=np.int64),
        )
        best = mask_iou(orig, gt).max(axis=1)
        assert np.median(best) > 0.97, name
        assert best.min() > 0.5, name


def _mutate(root: Path, folder: str, change: Any) -> None:
    path = root / folder / "_annotations.coco.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _first_polygon_ann(data: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], list))


def _first_rle_ann(data: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], dict))


BAD_CASES = {
    "missing image": (
        lambda root, d: (root / "valid" / d["images"][0]["file_name"]).unlink(),
        "valid",
        r"valid/_annotations.coco.json: image 0 \(set46_png.*\): no such file",
    ),
    "malformed json": (None, "valid", r"valid/_annotations.coco.json: malformed JSON at line 1"),
    "degenerate polygon": (
        lambda root, d: _first_polygon_ann(d).update(segmentation=[[10.0, 10.0, 20.0, 20.0]]),
        "valid",
        r"annotation \d+ \(image set46_png.*\): degenerate polygon",
    ),
    "zero-area polygon": (
        lambda root, d: _first_polygon_ann(d).update(segmentation=[[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]]),
        "valid",
        r"annotation \d+ \(image set46.*\): degenerate polygon: zero area",
    ),
    "out of bounds polygon": (
        lambda root, d: _first_polygon_ann(d).update(segmentation=[[10.0, 10.0, 1500.0, 10.0, 1500.0, 40.0]]),
        "valid",
        r"annotation \d+ \(image set46.*\): polygon out of bounds",
    ),
    "rle of another size": (
        lambda root, d: _first_rle_ann(d)["segmentation"].update(size=[640, 640]),
        "valid",
        r"annotation \d+ \(image set46.*\): RLE size \[640, 640\] differs",
    ),
    "unknown image id": (
        lambda root, d: d["annotations"][0].update(image_id=999),
        "valid",
        r"annotation \d+ refers to unknown image 999",
    ),
    "unknown category": (
        lambda root, d: d["annotations"][0].update(category_id=7),
        "valid",
        r"annotation \d+ \(image set46.*\): unknown category 7",
    ),
    "image size differs from json": (
        lambda root, d: d["images"][0].update(width=640),
        "valid",
        r"image 0 \(set46.*\) is 1024x1022 on disk but 640x1022 in the annotations",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_and_annotation(export: tuple[Path, dict[str, Any]], tmp_path: Path, case: str) -> None:
    src_root, _ = export
    root = tmp_path / "export"
    shutil.copytree(src_root, root)
    change, folder, message = BAD_CASES[case]
    if change is None:
        (root / folder / "_annotations.coco.json").write_text('{"images": [1, 2,, }')
    else:
        data = json.loads((root / folder / "_annotations.coco.json").read_text())
        change(root, data)
        (root / folder / "_annotations.coco.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message):
        import_coco(root, tmp_path / "ds", progress=False)


def test_skip_invalid_imports_the_rest_and_lists_what_it_skipped(
    export: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    src_root, truth = export
    root = tmp_path / "export"
    shutil.copytree(src_root, root)
    data = json.loads((root / "valid" / "_annotations.coco.json").read_text())
    bad = copy.deepcopy(_first_polygon_ann(data))
    _first_polygon_ann(data).update(segmentation=[[10.0, 10.0, 20.0, 20.0]])
    (root / "valid" / "_annotations.coco.json").write_text(json.dumps(data))
    summary = import_coco(root, tmp_path / "ds", skip_invalid=True, progress=False)
    assert summary.instances["val"] == len(truth["set46"]) - 1
    assert any(f"annotation {bad['id']}" in w and w.startswith("skipped") for w in summary.warnings)


def test_not_a_coco_export(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="Roboflow COCO export"):
        import_coco(tmp_path, tmp_path / "ds", progress=False)
