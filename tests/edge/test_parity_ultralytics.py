"""The device postprocess against the peer: ultralytics' own predictions on the same ONNX model.

Same frames (the Usiigaci val set, 16-bit, mapped to 8 bits once), same thresholds; ultralytics
with ``retina_masks=True`` so its masks are at the frame's resolution. Runs whenever ultralytics
is installed (it is in CI), at the model's operating confidence and at 0.001, where ~1000
candidates survive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cellseg.edge.engine_onnxruntime import OnnxRuntimeEngine
from cellseg.edge.imageio import read_image
from cellseg.edge.intensity import to_uint8
from cellseg.edge.postprocess import PostprocessConfig
from cellseg.edge.predictor import Predictor
from cellseg.edge.types import Frame
from cellseg.training.evaluate import predictions
from cellseg.training.metrics import Instances, box_iou, mask_iou

pytest.importorskip("ultralytics", reason="the parity check needs ultralytics (the 'train' extra)")

VAL_SETS = ["set46", "set47", "set48", "set49", "set50"]


@pytest.fixture(scope="module")
def peer(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cellseg.training.offline import import_ultralytics_offline

    ultralytics = import_ultralytics_offline(tmp_path_factory.mktemp("ultralytics"))
    return ultralytics.YOLO(str(shipped_model), task="segment")


@pytest.mark.parametrize("conf", [0.25, 0.001])
def test_detections_match_ultralytics(peer: Any, shipped_model: Path, usiigaci: Path, conf: float) -> None:
    import cv2

    with OnnxRuntimeEngine(shipped_model) as engine:
        predictor = Predictor(engine, PostprocessConfig(conf=conf, iou=0.7, max_det=1000))
        for name in VAL_SETS:
            image8 = to_uint8(read_image(usiigaci / "val" / name / "raw.tif"))
            ours = predictions(predictor(Frame(image8)).detections)
            result = peer.predict(cv2.cvtColor(image8, cv2.COLOR_GRAY2BGR), conf=conf, iou=0.7, max_det=1000,
                                  retina_masks=True, verbose=False)[0]  # fmt: skip
            n = len(result.boxes)
            theirs = Instances(
                boxes=result.boxes.xyxy.numpy().astype(np.float64),
                masks=list(result.masks.data.numpy().astype(bool)) if n else [],
                origins=np.zeros((n, 2), dtype=np.int64),
                scores=result.boxes.conf.numpy().astype(np.float64),
                class_ids=result.boxes.cls.numpy().astype(np.int64),
            )
            assert len(ours) == n, f"{name}: {len(ours)} detections, ultralytics {n}"
            assert n > 20, f"{name}: the shipped model should find the cells"
            # Both lists are in descending score order: detection i is detection i.
            boxes = np.diag(box_iou(ours.boxes, theirs.boxes))
            masks = np.diag(mask_iou(ours, theirs))
            np.testing.assert_allclose(ours.scores, theirs.scores, atol=1e-4)
            assert boxes.min() >= 0.99, f"{name}: box IoU {boxes.min():.4f}"
            assert masks.min() >= 0.95, f"{name}: mask IoU {masks.min():.4f}"
