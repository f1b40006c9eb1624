"""Models that are not YOLO-seg exports get a clear error naming what is wrong."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cellseg.edge.device import physical_cores
from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
from cellseg.edge.errors import ModelError, ModelMetadataError

META = {"imgsz": "[64, 64]", "names": "{0: 'cell'}", "stride": "32"}


def _model(path: Path, outputs: list[tuple[str, list[int]]], input_shape: list[int], meta: dict[str, str]) -> Path:
    """A tiny ONNX graph with the given input and zero-filled outputs of the given shapes."""
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)
    nodes, outs = [], []
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    for name, shape in outputs:
        dims = helper.make_tensor(f"{name}_dims", TensorProto.INT64, [len(shape)], shape)
        nodes.append(helper.make_node("Constant", [], [f"{name}_shape"], value=dims))
        nodes.append(helper.make_node("ConstantOfShape", [f"{name}_shape"], [name], value=zero))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, "g", [inp], outs)
    # IR version 8 (as exports from opset 17 have): the newest onnx writes IR 14 by default, which
    # the ONNX Runtime a device has (1.23 on the JetPack lane: at most IR 11) refuses to load.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    return path


def test_wrong_input_shape(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.onnx", [("o0", [1, 37, 84]), ("o1", [1, 32, 16, 16])], [1, 3, 32, 32], META)
    with pytest.raises(ModelError, match=r"not a YOLO-seg export: expected one input of shape \[1, 3, 64, 64\]"):
        OnnxRuntimeEngine(path).load()


def test_detection_model_without_masks(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.onnx", [("o0", [1, 5, 84])], [1, 3, 64, 64], META)
    with pytest.raises(ModelError, match=r"expected outputs \(1, 4\+nc\+nm, A\) and \(1, nm, h, w\)"):
        OnnxRuntimeEngine(path).load()


def test_class_count_disagrees_with_metadata(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.onnx", [("o0", [1, 40, 84]), ("o1", [1, 32, 16, 16])], [1, 3, 64, 64], META)
    with pytest.raises(ModelError, match=r"output0 has 40 rows but 4 \+ 1 classes \+ 32"):
        OnnxRuntimeEngine(path).load()


def test_missing_metadata(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.onnx", [("o0", [1, 37, 84]), ("o1", [1, 32, 16, 16])], [1, 3, 64, 64], {})
    with pytest.raises(ModelMetadataError, match="metadata lacks input size or class names"):
        OnnxRuntimeEngine(path).load()


def test_a_valid_signature_loads_and_runs(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.onnx", [("o0", [1, 37, 84]), ("o1", [1, 32, 16, 16])], [1, 3, 64, 64], META)
    with OnnxRuntimeEngine(path, threads=1) as engine:
        engine.warmup()
        out = engine.infer(np.zeros((1, 3, 64, 64), dtype=np.float32))
    assert out.predictions.shape == (37, 84) and out.prototypes.shape == (32, 16, 16)
    assert engine.precision == "fp32" and engine.engine_id.startswith("onnx:m.onnx:")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model file"):
        OnnxRuntimeEngine(tmp_path / "none.onnx").load()


def test_threads_default_to_physical_cores_counted_from_sysfs(tmp_path: Path) -> None:
    """Two SMT siblings per core: as many engine threads as cores, not as logical CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    for cpu in cpus:
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        first = cpu - cpu % 2
        topology.joinpath("thread_siblings_list").write_text(f"{first}-{first + 1}\n")
    assert physical_cores(tmp_path) == len({cpu - cpu % 2 for cpu in cpus})
    assert physical_cores(tmp_path / "absent") == len(cpus)  # no topology: logical CPUs
