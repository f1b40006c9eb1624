"""``cellseg export`` on the shipped weights: metadata, and parity with PyTorch on real frames."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
from cellseg.edge.errors import ModelError
from cellseg.edge.hashing import file_sha256
from cellseg.edge.pipeline.host import HostPipeline
from cellseg.edge.pipeline.postprocess import PostprocessConfig
from cellseg.edge.pipeline.types import Frame
from cellseg.training.dfl_softmax import REWRITE, rewrite_dfl_softmax
from cellseg.training.export import export_onnx, weights_epoch
from tests.conftest import SAMPLES, SHIPPED_WEIGHTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights() -> Path:
    if not SHIPPED_WEIGHTS.is_file():
        pytest.fail(f"the shipped weights {SHIPPED_WEIGHTS} are missing from the repository")
    return SHIPPED_WEIGHTS


def test_export_matches_pytorch_and_carries_metadata(
    weights: Path, shipped_model: Path, usiigaci: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    frames = [usiigaci / "val/set47/raw.tif", SAMPLES / "usiigaci-val-set50.png"]
    report = export_onnx(weights, out, frames, pixel_size_um=0.867)
    assert report.ok and len(report.checks) == 2
    for check in report.checks:
        assert check.max_abs_diff["boxes"] < 0.05  # pixels, on a 640 input
        assert check.max_abs_diff["scores_and_coefficients"] < 1e-3

    model = onnx.load(str(out))
    graph_in = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in graph_in] == [1, 3, 640, 640]  # static shape
    meta = json.loads({p.key: p.value for p in model.metadata_props}["cellseg"])
    assert meta["class_names"] == ["cell"] and meta["imgsz"] == [640, 640] and meta["stride"] == 32
    assert meta["weights_sha256"] == file_sha256(weights)
    assert meta["intensity_mapping"] == {"low_pct": 0.5, "high_pct": 99.5, "max_samples": 65536, "method": "percentile"}
    assert meta["precision"] == "fp32"
    assert meta["trained_pixel_um"] == 0.867  # for tiled inference on cameras with other pixels
    # The DFL's softmax runs over the last axis (training/dfl_softmax.py), and only once rewritten.
    assert meta["graph_rewrites"] == [REWRITE]
    softmax_axes = [a.i for n in model.graph.node if n.op_type == "Softmax" for a in n.attribute if a.name == "axis"]
    assert softmax_axes and set(softmax_axes) == {-1}
    before = model.SerializeToString()
    assert rewrite_dfl_softmax(model) is False and model.SerializeToString() == before
    # The epoch of these weights, with the validation metrics they were saved with.
    saved = torch.load(weights, map_location="cpu", weights_only=False)["train_metrics"]
    assert meta["weights_epoch"]["metrics/mAP50-95(M)"] == pytest.approx(saved["metrics/mAP50-95(M)"], abs=1e-5)

    # The fresh export behaves exactly like the shipped one on a real 16-bit frame.
    frame = Frame(read_image(usiigaci / "val/set48/raw.tif"))
    config = PostprocessConfig(conf=0.3)
    with OnnxRuntimeEngine(out) as fresh, OnnxRuntimeEngine(shipped_model) as shipped:
        a, b = HostPipeline(fresh, config)(frame).measurement, HostPipeline(shipped, config)(frame).measurement
    assert a.count == b.count and a.confluence_pct == pytest.approx(b.confluence_pct, abs=0.05)


def test_export_refuses_without_real_images(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="at least one real image"):
        export_onnx(weights, tmp_path / "m.onnx", [])


def test_export_refuses_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such weights file"):
        export_onnx(tmp_path / "none.pt", tmp_path / "m.onnx", [SAMPLES / "usiigaci-val-set50.png"])


def test_the_weights_epoch_is_the_one_whose_metrics_the_checkpoint_carries(weights: Path) -> None:
    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    results = checkpoint["train_results"]
    last = len(results["epoch"]) - 1
    assert weights_epoch(checkpoint) == {k: pytest.approx(float(v[last])) for k, v in results.items()}
    # An earlier epoch's weights (as best.pt usually is): that epoch, not the run's last or best.
    metric_keys = [k for k in checkpoint["train_metrics"] if k in results]
    earlier = {**checkpoint, "train_metrics": {k: results[k][40] for k in metric_keys}}
    found = weights_epoch(earlier)
    assert found is not None and found["epoch"] == results["epoch"][40]
    # Metrics that match no epoch, or a checkpoint without them: unknown, not a guess.
    assert weights_epoch({**checkpoint, "train_metrics": {k: -1.0 for k in metric_keys}}) is None
    assert weights_epoch({"model": None}) is None
