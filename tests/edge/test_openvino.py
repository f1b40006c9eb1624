"""OpenVINO as a backend: selected by name, FP32 measuring what ONNX Runtime measures on real
frames, BF16 only by explicit choice and only where the CPU has it, and the side-by-side bench."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cellseg.edge.bundles.engine_select import open_engine, pipeline_for
from cellseg.edge.capture.imageio import read_image
from cellseg.edge.errors import ConfigError
from cellseg.edge.pipeline.types import Frame

pytest.importorskip("openvino", reason="needs the openvino extra (not on a Jetson)")

from cellseg.edge.engines.openvino_engine import cpu_precisions


def _measure(model: Path, frames: list[Path], backend: str, compute: str) -> list[tuple[int, float]]:
    opened = open_engine(model, backend, threads=2, compute=compute)
    try:
        pipeline = pipeline_for(opened)
        return [(m.count, m.confluence_pct) for m in
                (pipeline(Frame(read_image(p), source=str(p))).measurement for p in frames)]  # fmt: skip
    finally:
        opened.engine.close()


def test_openvino_fp32_measures_what_onnx_runtime_does(shipped_model: Path, usiigaci: Path) -> None:
    frames = sorted((usiigaci / "val").rglob("raw.tif"))
    assert len(frames) >= 5
    ort = _measure(shipped_model, frames, "onnxruntime", "fp32")
    ov = _measure(shipped_model, frames, "openvino", "fp32")
    assert all(abs(a[0] - b[0]) <= 1 and abs(a[1] - b[1]) < 0.1 for a, b in zip(ort, ov, strict=True)), (ort, ov)


def test_bf16_only_when_asked_and_where_the_cpu_has_it(shipped_model: Path, usiigaci: Path) -> None:
    opened = open_engine(shipped_model, "openvino", threads=2)
    assert opened.engine.precision == "fp32" and opened.engine.engine_id.endswith(":fp32")  # never BF16 unasked
    opened.engine.close()
    with pytest.raises(ConfigError, match="ONNX Runtime computes in fp32"):
        open_engine(shipped_model, "onnxruntime", compute="bf16")
    if "bf16" not in cpu_precisions():
        with pytest.raises(ConfigError, match="this CPU has no BF16"):
            open_engine(shipped_model, "openvino", compute="bf16")
        return
    frames = sorted((usiigaci / "val").rglob("raw.tif"))
    ort = _measure(shipped_model, frames, "onnxruntime", "fp32")
    bf16 = _measure(shipped_model, frames, "openvino", "bf16")
    # BF16 moves counts by a few cells: that is why it is a choice, and why the gate must judge it.
    assert all(abs(a[0] - b[0]) <= 5 for a, b in zip(ort, bf16, strict=True)), (ort, bf16)


def test_bench_compares_backends_side_by_side(shipped_model: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cellseg", "bench", "--compare", "--runs", "1", "--model",
                           str(shipped_model)], capture_output=True, text=True, check=True, timeout=600)  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["backend", "precision", "images/s", "ms/image"]
    rows = {tuple(line.split()[:2]) for line in lines[2:] if line.strip()}
    assert ("onnxruntime", "fp32") in rows and ("openvino", "fp32") in rows
    reference = next(line for line in lines if line.startswith("onnxruntime"))
    assert reference.split()[4] == "1.00"  # the ratio's reference row


def _gate(args: list[str], out: Path) -> dict[str, object]:
    import json

    from cellseg.cli import main

    code = main(["gate", *args, "--threads", "2", "--quiet", "-o", str(out)])
    report = json.loads(out.read_text())
    assert code == (0 if report["passed"] else 3)
    return report


@pytest.mark.slow
def test_each_precision_is_gated_and_a_bundle_runs_only_where_a_gate_passed(
    shipped_model: Path, int8_model: Path, usiigaci_dataset: Path, signing_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """OpenVINO INT8 (and BF16 where the CPU has it) judged against ONNX Runtime FP32 on 25-45 real
    frames; a bundle carries the gates that passed, and a device runs it nowhere else."""
    from cellseg.build.bundle import make_bundle
    from cellseg.edge.bundles.flash import FlashSettings, flash_file
    from cellseg.edge.bundles.reader import load_trusted_keys
    from cellseg.edge.bundles.slots import SlotStore
    from cellseg.edge.errors import BundleError
    from tests.conftest import SAMPLES
    from tests.edge.test_flash import CPU

    data = str(usiigaci_dataset / "data.yaml")
    both = ["--data", data, "--split", "val", "--split", "train"]
    int8_args = [str(shipped_model), "--int8", str(int8_model), "--backend", "openvino", *both]
    int8_ov = _gate(int8_args, tmp_path / "a.json")
    # The INT8 model's 20 calibration frames are left out of the train split: 25 frames judge it.
    assert int8_ov["images"] == 25 and int8_ov["excluded_calibration"] == 20
    assert int8_ov["candidate"]["backend"] == "openvino" and int8_ov["candidate"]["precision"] == "int8"
    assert int8_ov["passed"] is True and int8_ov["stable"] is True
    low, high = int8_ov["losses_ci95"]["count_pct_points"]
    assert low <= int8_ov["losses"]["count_pct_points"] <= high < 2.0

    reference = sorted(SAMPLES.glob("*.png"))[0]
    keys = load_trusted_keys([signing_keys[1]])
    store = SlotStore(tmp_path / "engines")
    gated = make_bundle(int8_model, tmp_path / "gated.cellseg", signing_keys[0], reference,
                        gate_report=_read(int8_model.with_suffix(".gate.json")), compute_gates=[int8_ov])  # fmt: skip
    assert set(gated.compute_gates) == {"openvino:fp32"}
    plain = make_bundle(int8_model, tmp_path / "plain.cellseg", signing_keys[0], reference,
                        gate_report=_read(int8_model.with_suffix(".gate.json")))  # fmt: skip
    assert plain.compute_gates == {}
    on_openvino = FlashSettings(trusted_keys=keys, max_bytes=1 << 30, facts=CPU, backend="openvino", threads=2)
    slot = flash_file(tmp_path / "gated.cellseg", store, on_openvino).slot
    opened = open_engine(slot, "openvino", threads=2)
    assert opened.engine.precision == "int8"
    opened.engine.close()
    with pytest.raises(BundleError, match="carries no accuracy gate for openvino at fp32"):
        flash_file(tmp_path / "plain.cellseg", store, on_openvino)
    # ONNX Runtime runs either as built.
    open_engine(flash_file(tmp_path / "plain.cellseg", store, FlashSettings(keys, 1 << 30, CPU, threads=2)).slot,
                "onnxruntime").engine.close()  # fmt: skip

    # A failed gate, or one of another model, is not carried.
    failed = {**int8_ov, "passed": False, "reasons": ["count error grows"]}
    with pytest.raises(BundleError, match="refused this openvino:fp32 model: count error grows"):
        make_bundle(int8_model, tmp_path / "x.cellseg", signing_keys[0], reference,
                    gate_report=_read(int8_model.with_suffix(".gate.json")), compute_gates=[failed])  # fmt: skip
    with pytest.raises(BundleError, match="openvino:fp32 gate report is for another model"):
        make_bundle(shipped_model, tmp_path / "x.cellseg", signing_keys[0], reference, compute_gates=[int8_ov])

    if "bf16" not in cpu_precisions():
        return
    bf16 = _gate([str(shipped_model), "--backend", "openvino", "--precision", "bf16", *both], tmp_path / "b.json")
    assert bf16["images"] == 45 and bf16["candidate"]["compute"] == "bf16" and bf16["passed"] is True
    make_bundle(shipped_model, tmp_path / "bf16.cellseg", signing_keys[0], reference, compute_gates=[bf16])
    make_bundle(shipped_model, tmp_path / "fp32.cellseg", signing_keys[0], reference)
    at_bf16 = FlashSettings(keys, 1 << 30, CPU, backend="openvino", threads=2, compute="bf16")
    slot = flash_file(tmp_path / "bf16.cellseg", store, at_bf16).slot
    opened = open_engine(slot, "openvino", threads=2, compute="bf16")
    assert opened.engine.precision == "bf16"
    opened.engine.close()
    with pytest.raises(BundleError, match="carries no accuracy gate for openvino at bf16"):
        flash_file(tmp_path / "fp32.cellseg", store, at_bf16)
    # FP32 on OpenVINO computes what ONNX Runtime does: no gate needed.
    fp32_ov = FlashSettings(keys, 1 << 30, CPU, backend="openvino", threads=2)
    open_engine(flash_file(tmp_path / "fp32.cellseg", store, fp32_ov).slot, "openvino").engine.close()


def _read(path: Path) -> dict[str, object]:
    from cellseg.build.gate import read_report

    return read_report(path)


@pytest.mark.slow
def test_bench_compare_gives_every_precision_its_gate_verdict(
    shipped_model: Path, int8_model: Path, usiigaci_dataset: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cellseg", "bench", "--compare", "--runs", "1", "--model", str(shipped_model),
         "--int8", str(int8_model), "--gate", str(usiigaci_dataset / "data.yaml"), "--threads", "2"],
        capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[0].split()[-1] == "gate"
    rows = {tuple(line.split()[:2]): line for line in lines[2:] if line.strip() and not line.startswith(" ")}
    assert "reference" in rows[("onnxruntime", "fp32")]
    for key in (("onnxruntime", "int8"), ("openvino", "int8"), ("openvino", "fp32")):
        assert key in rows, (key, done.stdout)
        assert "pass (" in rows[key] or "REFUSED (" in rows[key]
    # The table says whether a verdict is stable: on the same 5 val frames, the INT8 model's own
    # gate (cellseg quantize's) and the table's row agree.
    stable = _read(int8_model.with_suffix(".gate.json"))["stable"]
    assert ("unstable" in rows[("onnxruntime", "int8")]) == (not stable), (stable, rows[("onnxruntime", "int8")])
