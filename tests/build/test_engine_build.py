"""The TensorRT build stage where no GPU is needed: version dispatch, build plans, the I/O plan
the device checks an engine against, the build report into the bundle manifest, and a clear
answer on a machine without TensorRT."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnxruntime as ort
import pytest

from cellseg.build.bundle import EngineBuildInfo, make_bundle
from cellseg.build.engine_build import BuildReport, onnx_has_qdq, plan_build
from cellseg.cli import main
from cellseg.edge.bundles.flash import FlashSettings, flash_file
from cellseg.edge.bundles.reader import load_trusted_keys
from cellseg.edge.bundles.slots import SlotStore
from cellseg.edge.device import DeviceFacts
from cellseg.edge.engines.cuda_pipeline import check_gpu_outputs
from cellseg.edge.engines.tensorrt_engine import TensorSpec, plan_io, supported_tensorrt
from cellseg.edge.errors import BundleError, ConfigError, DependencyError, ModelError
from cellseg.edge.pipeline.model_info import ModelInfo
from tests.conftest import SAMPLES


def test_supported_tensorrt_versions() -> None:
    assert supported_tensorrt("8.6.2.3") == 8 and supported_tensorrt("10.3.0.30") == 10
    assert supported_tensorrt("10.15.1") == 10
    for old in ("8.5.2", "7.1.3", "11.0.0"):  # 8.5: JetPack 5, whose Python 3.8 cannot run cellseg
        with pytest.raises(DependencyError, match="not supported"):
            supported_tensorrt(old)
    with pytest.raises(ConfigError):
        supported_tensorrt("latest")


def test_build_plans_per_version_and_precision() -> None:
    fp16_8 = plan_build("8.6.2", "fp16", has_qdq=False)
    assert fp16_8.network_flags == ("EXPLICIT_BATCH",) and fp16_8.builder_flags == ("FP16",)
    assert not fp16_8.calibrator and not fp16_8.progress_monitor and fp16_8.workspace_bytes == 1 << 30
    int8_10 = plan_build("10.3.0", "int8", has_qdq=True, workspace_mb=2048)
    assert int8_10.network_flags == () and int8_10.builder_flags == ("INT8", "FP16") and int8_10.progress_monitor
    assert not int8_10.calibrator and int8_10.workspace_bytes == 2 << 30
    assert plan_build("10.3.0", "int8", has_qdq=False).calibrator  # the implicit fallback
    with pytest.raises(ModelError, match="Q/DQ"):
        plan_build("10.3.0", "fp16", has_qdq=True)
    with pytest.raises(ConfigError, match="workspace"):
        plan_build("10.3.0", "fp16", has_qdq=False, workspace_mb=8)


def test_qdq_detection_on_the_real_models(shipped_model: Path, int8_model: Path) -> None:
    assert not onnx_has_qdq(shipped_model) and onnx_has_qdq(int8_model)


def _specs(model: Path) -> list[TensorSpec]:
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ins = [TensorSpec(i.name, tuple(i.shape), "float32", True) for i in s.get_inputs()]
    return ins + [TensorSpec(o.name, tuple(o.shape), "float32", False) for o in s.get_outputs()]


def test_engine_io_is_checked_against_the_model(shipped_model: Path) -> None:
    s = ort.InferenceSession(str(shipped_model), providers=["CPUExecutionProvider"])
    info = ModelInfo.from_metadata(dict(s.get_modelmeta().custom_metadata_map))
    specs = _specs(shipped_model)
    io = plan_io(specs, info)
    assert io.input.shape == (1, 3, 640, 640) and io.predictions.shape == (1, 37, 8400)
    assert io.prototypes.shape == (1, 32, 160, 160)
    assert io.total_bytes == 4 * (3 * 640 * 640 + 37 * 8400 + 32 * 160 * 160)
    half = [TensorSpec(t.name, t.shape, "float16", t.is_input) for t in specs]
    assert plan_io(half, info).total_bytes == io.total_bytes // 2
    cases = {
        "input of shape": [TensorSpec("images", (1, 3, 320, 320), "float32", True), *specs[1:]],
        "dynamic": [*specs[:2], TensorSpec(specs[2].name, (1, 32, -1, 160), "float32", False)],
        "rows": [specs[0], TensorSpec("output0", (1, 38, 8400), "float32", False), specs[2]],
        "int8": [*specs[:2], TensorSpec(specs[2].name, specs[2].shape, "int8", False)],
        "expected outputs": specs[:2],
    }
    for phrase, bad in cases.items():
        with pytest.raises(ModelError, match=phrase):
            plan_io(bad, info)


def test_the_gpu_pipeline_takes_an_fp16_input_and_refuses_fp16_outputs(shipped_model: Path) -> None:
    s = ort.InferenceSession(str(shipped_model), providers=["CPUExecutionProvider"])
    info = ModelInfo.from_metadata(dict(s.get_modelmeta().custom_metadata_map))
    specs = _specs(shipped_model)
    half_input = [TensorSpec(specs[0].name, specs[0].shape, "float16", True), *specs[1:]]
    check_gpu_outputs(plan_io(half_input, info))  # the preprocess kernel writes half
    for k in (1, 2):
        half_output = list(specs)
        half_output[k] = TensorSpec(specs[k].name, specs[k].shape, "float16", False)
        with pytest.raises(ModelError, match=f"output '{specs[k].name}' is float16; the GPU postprocess reads float32"):
            check_gpu_outputs(plan_io(half_output, info))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_says_so(
    shipped_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build-engine", str(shipped_model), "-o", str(tmp_path / "m.engine")]) == 2
    err = capsys.readouterr().err
    assert "needs the 'tensorrt' package" in err and "JetPack" in err
    assert not (tmp_path / "m.engine").exists()


def test_a_tensorrt_bundle_carries_the_build_facts_and_a_cpu_device_refuses_it(
    shipped_model: Path, signing_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    from cellseg.edge.hashing import file_sha256

    plan = tmp_path / "model.engine"
    plan.write_bytes(b"stand-in for a serialised plan: this test reads the manifest, it never loads it")
    report = BuildReport("fp16", "10.3.0.30", "8.7", "36.4.3", file_sha256(shipped_model), 412.0, {})
    report.write(plan.with_suffix(".json"))
    info = EngineBuildInfo.read(plan.with_suffix(".json"))
    reference = sorted(SAMPLES.glob("*.png"))[0]
    manifest = make_bundle(shipped_model, tmp_path / "trt.cellseg", signing_keys[0], reference,
                           engine=plan, engine_info=info)  # fmt: skip
    e = manifest.engine
    assert (e.kind, e.precision, e.tensorrt_version, e.compute_capability, e.l4t) == (
        "tensorrt",
        "fp16",
        "10.3.0.30",
        "8.7",
        "36.4.3",
    )
    assert e.onnx_sha256 == file_sha256(shipped_model) and manifest.model["imgsz"] == [640, 640]
    assert manifest.reference.count > 0 and len(manifest.reference.boxes) == manifest.reference.count
    settings = FlashSettings(load_trusted_keys([signing_keys[1]]), 1 << 30, DeviceFacts(onnxruntime="1.32"))
    with pytest.raises(BundleError, match="no TensorRT"):
        flash_file(tmp_path / "trt.cellseg", SlotStore(tmp_path / "engines"), settings)
    other = BuildReport("fp16", "10.3.0", "8.7", None, "0" * 64, 1.0, {})
    other.write(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="another ONNX model"):
        make_bundle(shipped_model, tmp_path / "x.cellseg", signing_keys[0], reference, engine=plan,
                    engine_info=EngineBuildInfo.read(tmp_path / "other.json"))  # fmt: skip
    assert json.loads(plan.with_suffix(".json").read_text())["tensorrt_version"] == "10.3.0.30"


def test_the_engine_is_chosen_by_the_bundle_and_the_backend_setting(
    bundles: dict[str, Path], signing_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """The same config runs an ONNX bundle with ONNX Runtime, and a TensorRT bundle with the
    TensorRT backend (which, on a machine without it, says exactly what is missing)."""
    from cellseg.edge.bundles.engine_select import open_engine
    from cellseg.edge.bundles.reader import parse_manifest

    settings = FlashSettings(load_trusted_keys([signing_keys[1]]), 1 << 30, DeviceFacts(onnxruntime="1.32"))
    slot = flash_file(bundles["fp32"], SlotStore(tmp_path / "engines"), settings).slot
    opened = open_engine(slot, "auto", threads=1)
    assert opened.backend.name == "onnxruntime" and "onnxruntime (fp32) from slot" in opened.describe()
    opened.engine.close()
    with pytest.raises(ConfigError, match="is an ONNX model"):
        open_engine(slot, "tensorrt")
    # The slot rewritten as a TensorRT one (its manifest no longer verifies, but engine selection
    # reads an installed slot, whose signature was checked when it was flashed).
    manifest = json.loads((slot / "manifest.json").read_text())
    manifest["engine"].update(kind="tensorrt", tensorrt_version="10.3.0", compute_capability="8.7")
    (slot / "manifest.json").write_text(json.dumps(manifest))
    assert parse_manifest((slot / "manifest.json").read_bytes()).engine.kind == "tensorrt"
    with pytest.raises(DependencyError, match="tensorrt"):
        open_engine(slot, "auto")
    with pytest.raises(ConfigError, match="holds a TensorRT engine"):
        open_engine(slot, "onnxruntime")
