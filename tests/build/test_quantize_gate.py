"""INT8 quantisation of the shipped model and the accuracy gate, on the real Usiigaci frames."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import onnx
import onnxruntime
import pytest

from cellseg.build.bundle import make_bundle
from cellseg.build.gate import read_report
from cellseg.build.quantize import choose_calibration_images, head_float_nodes
from cellseg.cli import main
from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
from cellseg.edge.errors import BundleError, ConfigError, DatasetError
from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow


def test_int8_model_is_qdq_with_the_decode_in_float_and_passes_the_gate(
    int8_model: Path, shipped_model: Path, usiigaci_dataset: Path
) -> None:
    model = onnx.load(str(int8_model))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 100 and ops.count("DequantizeLinear") > 100
    decode = set(head_float_nodes(onnx.load(str(shipped_model))))
    logits = {f"/model.23/cv3.{i}/cv3.{i}.2/Conv" for i in range(3)}  # the class-logit convolutions
    assert {"/model.23/dfl/SoftmaxLast", "/model.23/dfl/Expectation", "/model.23/Sigmoid"} | logits <= decode
    assert not any(n.startswith(("/model.23/cv2.", "/model.23/cv4.", "/model.23/proto/")) for n in decode)
    # The decode computes in float: none of its results is quantised again.
    q_inputs = {i for n in model.graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    decoded = [n for n in model.graph.node if n.name in decode]
    requantised = [n.name for n in decoded if set(n.output) & q_inputs]
    assert len(decoded) == len(decode) and requantised == []
    # The class-logit convolutions keep float weights; every other Conv reads int8 weights.
    dequantised = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = {n.name: n.input[1] in dequantised for n in model.graph.node if n.op_type == "Conv"}
    assert not any(convs[name] for name in logits)
    assert all(int8 for name, int8 in convs.items() if name not in logits)
    # 7-bit weights: a pair of u8 x s8 products (255 * 64 * 2) fits the int16 that AVX2 CPUs
    # without VNNI sum them in, so every CPU computes the model the gate measured.
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dq_inputs = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    int8_weights = [weights[name] for name in dq_inputs if weights[name].dtype == "int8"]
    assert len(int8_weights) > 50 and max(int(abs(w.astype(int)).max()) for w in int8_weights) <= 64
    with OnnxRuntimeEngine(int8_model, threads=1) as engine:
        assert engine.precision == "int8"
        calibration = engine.info.extra["quantization"]["calibration"]
    again = choose_calibration_images(usiigaci_dataset / "images" / "train", 20)
    assert calibration["sha256"] == again.sha256 and calibration["count"] == 20
    report = read_report(int8_model.with_suffix(".gate.json"))
    assert report["passed"] is True and report["images"] == 5
    assert report["losses"]["mask_map_points"] <= 1.0 and report["losses"]["count_pct_points"] <= 2.0
    # Every loss, mAP included, comes with its paired-bootstrap interval around it.
    for key, loss in report["losses"].items():
        low, high = report["losses_ci95"][key]
        assert low <= loss <= high and low < high, (key, loss, low, high)
    assert report["reference"]["mask_map50_95"] > 0.2  # a real model on real frames, not an empty comparison
    # Where it was measured: INT8 arithmetic on a CPU depends on its instruction set.
    assert report["machine"]["onnxruntime"] == onnxruntime.__version__ and report["machine"]["device"]
    if platform.machine() == "x86_64":  # every x86_64 machine of this decade has AVX2 at least
        assert "avx2" in report["machine"]["int8_isa"].split()


def test_the_gate_refuses_a_quantisation_of_the_head_and_bundle_will_not_package_it(
    shipped_model: Path,
    usiigaci_dataset: Path,
    signing_keys: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "broken-int8.onnx"
    args = ["quantize", str(shipped_model), "-o", str(out), "--data", str(usiigaci_dataset / "data.yaml"),
            "--head", "quantize", "--calibration-images", "4", "--threads", "2", "--quiet"]  # fmt: skip
    assert main(args) == 3
    printed = capsys.readouterr().out
    assert "REFUSED" in printed and "mask mAP50-95 drops" in printed
    report = json.loads(out.with_suffix(".gate.json").read_text())
    assert report["passed"] is False and report["losses"]["mask_map_points"] > 1.0
    # A broken head loses mAP on every resample of the frames: a refusal more frames would not overturn.
    assert report["losses_ci95"]["mask_map_points"][0] > 1.0
    with pytest.raises(BundleError, match="accuracy gate refused"):
        make_bundle(out, tmp_path / "b.cellseg", signing_keys[0], sorted(SAMPLES.glob("*.png"))[0], gate_report=report)
    with pytest.raises(BundleError, match="needs the accuracy gate"):
        make_bundle(out, tmp_path / "b.cellseg", signing_keys[0], sorted(SAMPLES.glob("*.png"))[0])
    assert not (tmp_path / "b.cellseg").exists()


def test_a_gate_report_for_another_model_is_not_accepted(
    int8_model: Path, shipped_model: Path, signing_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    report = read_report(int8_model.with_suffix(".gate.json"))
    report["candidate"]["sha256"] = "0" * 64
    with pytest.raises(BundleError, match="another model"):
        make_bundle(int8_model, tmp_path / "b.cellseg", signing_keys[0], sorted(SAMPLES.glob("*.png"))[0],
                    gate_report=report)  # fmt: skip


def test_calibration_choice_is_spread_deterministic_and_checked(usiigaci_dataset: Path, tmp_path: Path) -> None:
    folder = usiigaci_dataset / "images" / "train"
    a, b = choose_calibration_images(folder, 5), choose_calibration_images(folder, 5)
    everything = sorted(folder.iterdir())
    assert a == b and a.images[0] == everything[0] and a.images[-1] == everything[-1]
    assert choose_calibration_images(folder, 1000).images == tuple(everything)
    with pytest.raises(ConfigError):
        choose_calibration_images(folder, 0)
    with pytest.raises(DatasetError, match="no images"):
        choose_calibration_images(tmp_path, 5)
