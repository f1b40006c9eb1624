"""The DFL rewrite on the DFL alone, fed the shipped model's own box logits for a real frame:
same numbers, and graphs that only look like it are left alone.

(The rewrite of a whole export from the shipped weights, checked against PyTorch, is in test_export.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.pipeline.model_info import ModelInfo
from cellseg.edge.pipeline.preprocess import Preprocessor
from cellseg.edge.pipeline.types import Frame
from cellseg.training.dfl_softmax import rewrite_dfl_softmax

ANCHORS = 8400


def dfl_graph(pads: list[int] | None = None) -> onnx.ModelProto:
    """ultralytics' DFL as its ONNX export writes it: (1, 64, A) -> (1, 4, A)."""
    conv_attrs = {"kernel_shape": [1, 1]} | ({"pads": pads} if pads else {})
    nodes = [
        helper.make_node("Reshape", ["x", "shape4"], ["r"], name="/model.23/dfl/Reshape"),
        helper.make_node("Transpose", ["r"], ["t"], name="/model.23/dfl/Transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Softmax", ["t"], ["s"], name="/model.23/dfl/Softmax", axis=1),
        helper.make_node("Conv", ["s", "w"], ["c"], name="/model.23/dfl/conv/Conv", **conv_attrs),
        helper.make_node("Reshape", ["c", "shape3"], ["y"], name="/model.23/dfl/Reshape_1"),
    ]
    out_anchors = ANCHORS + 2 * (pads[1] if pads else 0)
    graph = helper.make_graph(
        nodes,
        "dfl",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, ANCHORS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, out_anchors])],
        [
            numpy_helper.from_array(np.array([1, 4, 16, ANCHORS], np.int64), "shape4"),
            numpy_helper.from_array(np.array([1, -1, out_anchors], np.int64), "shape3"),
            numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "w"),
        ],
        # What onnxslim leaves: shapes of the intermediate tensors the rewrite replaces.
        value_info=[helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 16, 4, ANCHORS])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.fixture(scope="module")
def box_logits(shipped_model: Path, usiigaci: Path) -> np.ndarray:
    """The shipped model's 64 box-distance logits per anchor (the DFL's input) on a real frame."""
    model = onnx.load(str(shipped_model))
    info = ModelInfo.from_metadata({p.key: p.value for p in model.metadata_props}, shipped_model)
    tensor, _ = Preprocessor(info.input_width, info.input_height, info.mapping)(
        Frame(read_image(usiigaci / "val/set48/raw.tif"))
    )
    model.graph.output.append(helper.make_tensor_value_info("/model.23/Concat_output_0", TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = np.asarray(session.run(["/model.23/Concat_output_0"], {session.get_inputs()[0].name: tensor})[0])
    assert logits.shape == (1, 64, ANCHORS)
    return logits


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_the_rewritten_dfl_gives_the_same_distances(box_logits: np.ndarray) -> None:
    model = dfl_graph()
    before = run(model, box_logits)
    assert rewrite_dfl_softmax(model) is True
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Reshape", "Transpose", "Softmax", "MatMul", "Reshape"]
    assert not [v.name for v in model.graph.value_info if v.name == "t"]  # stale shape removed
    assert [i.name for i in model.graph.initializer if i.name == "w"] == []  # the Conv weight is gone
    after = run(model, box_logits)
    assert after.shape == before.shape == (1, 4, ANCHORS)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)
    assert after.min() >= 0.0 and after.max() <= 15.0  # expected bins of a distribution over 0..15


def test_a_padded_conv_is_not_the_dfl_and_stays() -> None:
    model = dfl_graph(pads=[0, 1, 0, 1])
    before = model.SerializeToString()
    assert rewrite_dfl_softmax(model) is False
    assert model.SerializeToString() == before
