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


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A lab's signing key pair: (private key, public key)."""
    from cellseg.build.bundle import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys") / "lab")


@pytest.fixture(scope="session")
def int8_model(shipped_model: Path, usiigaci_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model quantised to INT8 Q/DQ on 20 Usiigaci train frames, with its gate report
    (``int8.gate.json`` beside it)."""
    from cellseg.build.gate import run_gate, write_report
    from cellseg.build.quantize import choose_calibration_images, quantize

    out = tmp_path_factory.mktemp("int8") / "int8.onnx"
    calibration = choose_calibration_images(usiigaci_dataset / "images" / "train", 20)
    quantize(shipped_model, out, calibration, progress=False)
    report = run_gate(shipped_model, out, usiigaci_dataset / "data.yaml", threads=2, progress=False)
    write_report(report, out.with_suffix(".gate.json"))
    return out


@pytest.fixture(scope="session")
def bundles(
    shipped_model: Path, int8_model: Path, signing_keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Signed ONNX bundles of the shipped FP32 model and its INT8 quantisation."""
    from cellseg.build.bundle import make_bundle
    from cellseg.build.gate import read_report

    out = tmp_path_factory.mktemp("bundles")
    reference = sorted(SAMPLES.glob("*.png"))[0]
    make_bundle(shipped_model, out / "fp32.cellseg", signing_keys[0], reference)
    gate = read_report(int8_model.with_suffix(".gate.json"))
    make_bundle(int8_model, out / "int8.cellseg", signing_keys[0], reference, gate_report=gate)
    return {"fp32": out / "fp32.cellseg", "int8": out / "int8.cellseg"}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cellseg wheel, built from this checkout as install.sh builds it."""
    from tests.packaging import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def wheelhouse(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel and every dependency of the device extras, for installs without an index."""
    from tests.packaging import download_wheelhouse

    return download_wheelhouse(wheel, tmp_path_factory.mktemp("wheelhouse"))
