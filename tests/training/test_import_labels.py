from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.errors import DatasetError
from cellseg.edge.pipeline.intensity import to_uint8
from cellseg.training.evaluate import ground_truth, union_pct
from cellseg.training.import_labels import import_label_images, instances_from_label_image
from cellseg.training.yolo_dataset import load_data_yaml


def test_instance_counts_equal_gt_stats(usiigaci_dataset: Path, gt_stats: dict) -> None:
    assert len(gt_stats) == 45
    for (split, name), row in gt_stats.items():
        lines = (usiigaci_dataset / "labels" / split / f"{name}.txt").read_text().splitlines()
        assert len(lines) == int(row["n_instances"]), f"{split}/{name}"


def test_polygons_reproduce_the_ground_truth_coverage(usiigaci_dataset: Path, gt_stats: dict) -> None:
    for split, name in [("train", "set1"), ("train", "set16"), ("val", "set46"), ("val", "set50")]:
        row = gt_stats[(split, name)]
        w, h = int(row["width"]), int(row["height"])
        gt = ground_truth(usiigaci_dataset / "labels" / split / f"{name}.txt", w, h)
        # Multi-part cells keep their largest part, so coverage may only shrink, and only a little.
        assert union_pct(gt, w, h) == pytest.approx(100 * float(row["gt_coverage_fraction"]), abs=0.3)


def test_images_are_mapped_with_the_device_function(usiigaci: Path, usiigaci_dataset: Path) -> None:
    written = cv2.imread(str(usiigaci_dataset / "images" / "val" / "set46.png"), cv2.IMREAD_UNCHANGED)
    expected = to_uint8(read_image(usiigaci / "val" / "set46" / "raw.tif"))
    assert written.dtype == np.uint8
    np.testing.assert_array_equal(written, expected)


def test_data_yaml_and_summary(usiigaci_dataset: Path) -> None:
    data = load_data_yaml(usiigaci_dataset / "data.yaml")
    assert data["names"] == ["cell"]
    assert data["train"] == "images/train" and data["val"] == "images/val"
    raw = yaml.safe_load((usiigaci_dataset / "data.yaml").read_text())
    assert "path" not in raw  # relative: the dataset folder can be moved


def test_tiny_and_split_objects_are_kept_and_reported() -> None:
    label = np.zeros((40, 40), dtype=np.uint8)
    label[5:15, 5:15] = 1  # a square
    label[20, 20:23] = 2  # a one-pixel-high line: no contour area
    label[30:33, 2:5] = 3  # two parts of one object
    label[30:38, 30:38] = 3
    instances, warnings = instances_from_label_image(label, "x.png")
    assert len(instances) == 3
    assert [inst.area for inst in instances] == [100.0, 3.0, 9.0 + 64.0]
    line = instances[1].polygon
    assert line[:, 0].min() == 19.5 and line[:, 0].max() == 22.5  # pixel edges, not centres
    assert any("object 2" in w and "box" in w for w in warnings)
    assert any("object 3" in w and "2 separate parts" in w for w in warnings)


def _copy_sets(usiigaci: Path, dest: Path, sets: list[tuple[str, str]]) -> Path:
    for split, name in sets:
        shutil.copytree(usiigaci / split / name, dest / split / name)
    return dest


def test_label_image_of_another_size_is_refused(usiigaci: Path, tmp_path: Path) -> None:
    src = _copy_sets(usiigaci, tmp_path / "src", [("train", "set1")])
    label = cv2.imread(str(src / "train/set1/instances_ids.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(src / "train/set1/instances_ids.png"), label[:-2])
    with pytest.raises(
        DatasetError, match=r"set1/instances_ids.png: label image is 1024x1020 but its frame .* 1024x1022"
    ):
        import_label_images(src, tmp_path / "out", progress=False)


def test_missing_label_image_is_named(usiigaci: Path, tmp_path: Path) -> None:
    src = _copy_sets(usiigaci, tmp_path / "src", [("train", "set1")])
    (src / "train/set1/instances_ids.png").unlink()
    with pytest.raises(DatasetError, match=r"set1: has raw\.tif but no label image instances_ids\.png"):
        import_label_images(src, tmp_path / "out", progress=False)


def test_corrupt_frame_is_named(usiigaci: Path, tmp_path: Path) -> None:
    src = _copy_sets(usiigaci, tmp_path / "src", [("train", "set1")])
    raw = src / "train/set1/raw.tif"
    raw.write_bytes(raw.read_bytes()[:2000])
    with pytest.raises(Exception, match=r"set1/raw.tif"):
        import_label_images(src, tmp_path / "out", progress=False)


def test_existing_dataset_is_not_overwritten_by_accident(usiigaci: Path, tmp_path: Path) -> None:
    src = _copy_sets(usiigaci, tmp_path / "src", [("train", "set1")])
    import_label_images(src, tmp_path / "out", progress=False)
    with pytest.raises(DatasetError, match="--overwrite"):
        import_label_images(src, tmp_path / "out", progress=False)
    summary = import_label_images(src, tmp_path / "out", progress=False, overwrite=True)
    assert summary.images == {"train": 1}
    assert summary.to_dict()["instances_per_image"]["max"] == 66


def test_dataset_found_from_a_relative_yaml_path(usiigaci_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(usiigaci_dataset.parent)
    data = load_data_yaml(Path(usiigaci_dataset.name) / "data.yaml")
    assert Path(data["path"]) == usiigaci_dataset.resolve()
