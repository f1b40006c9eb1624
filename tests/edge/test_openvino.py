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
