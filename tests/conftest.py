"""Shared fixtures: the real data in ../shared/data and the model this project trained."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "cellseg-usiigaci-yolo11n-seg.onnx"
SHIPPED_WEIGHTS = REPO / "models" / "cellseg-usiigaci-yolo11n-seg.pt"
SAMPLES = REPO / "samples"


def _data_root() -> Path:
    env = os.environ.get("CELLSEG_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if not (root / "usiigaci" / "gt_stats.csv").is_file():
        pytest.skip(f"real microscopy data not found at {root} (set CELLSEG_DATA to the shared data folder)")
    return root


@pytest.fixture(scope="session")
def usiigaci(data_root: Path) -> Path:
    return data_root / "usiigaci"


@pytest.fixture(scope="session")
def gt_stats(usiigaci: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(usiigaci / "gt_stats.csv", newline="") as f:
        return {(r["split"], r["set"]): r for r in csv.DictReader(f)}


@pytest.fixture(scope="session")
def usiigaci_dataset(usiigaci: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole Usiigaci set imported once per session as a YOLO-seg dataset."""
    from cellseg.training.import_labels import import_label_images

    out = tmp_path_factory.mktemp("usiigaci_ds")
    import_label_images(usiigaci, out, overwrite=True, progress=False)
    return out


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    if not SHIPPED_MODEL.is_file():
        pytest.fail(f"the shipped model {SHIPPED_MODEL} is missing from the repository")
    return SHIPPED_MODEL
