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

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
from cellseg.edge.pipeline.host import HostPipeline
from cellseg.edge.pipeline.intensity import to_uint8
from cellseg.edge.pipeline.postprocess import PostprocessConfig
from cellseg.edge.pipeline.types import Frame
from cellseg.training.evaluate import predictions
from cellseg.training.metrics import Instances, box_iou

pytest.importorskip("ultralytics", reason="the parity check needs ultralytics (the 'train' extra)")

VAL_SETS = ["set46", "set47", "set48", "set49", "set50"]


@pytest.fixture(scope="module")
def peer(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cellseg.training.offline import import_ultralytics_offline

    ultralytics = import_ultralytics_offline(tmp_path_factory.mktemp("ultralytics"))
    return ultralytics.YOLO(str(shipped_model), task="segment")


def _pair_iou(ours: Instances, i: int, theirs_full: np.ndarray) -> float:
    """IoU of our cropped mask i with the peer's full-frame mask."""
    x, y = (int(v) for v in ours.origins[i])
    m = ours.masks[i]
    inter = int(np.count_nonzero(theirs_full[y : y + m.shape[0], x : x + m.shape[1]] & m))
    union = int(m.sum()) + int(theirs_full.sum()) - inter
    return inter / union if union else 1.0


def _differs_only_on_box_edges(ours: Instances, i: int, theirs_full: np.ndarray) -> bool:
    """True when two masks differ only in the first/last pixel row or column of the box.

    A box edge that lands on a whole pixel coordinate (x1 = 512.0000 in one float pipeline,
    511.9999 in the other) takes or leaves a whole column of mask pixels; that is rounding,
    not a difference in the masks. It happens among the junk detections at conf 0.001.
    """
    h, w = theirs_full.shape
    mine = np.zeros((h, w), dtype=bool)
    x, y = (int(v) for v in ours.origins[i])
    m = ours.masks[i]
    mine[y : y + m.shape[0], x : x + m.shape[1]] = m
    rows, cols = np.nonzero(mine ^ theirs_full)
    x0, y0, x1, y1 = ours.boxes[i]
    edge_cols = {int(np.ceil(x0)) - 1, int(np.ceil(x0)), int(np.ceil(x1)) - 1, int(np.ceil(x1))}
    edge_rows = {int(np.ceil(y0)) - 1, int(np.ceil(y0)), int(np.ceil(y1)) - 1, int(np.ceil(y1))}
    return all(c in edge_cols or r in edge_rows for r, c in zip(rows.tolist(), cols.tolist(), strict=True))


# At 0.001 ultralytics materialises ~1000 full-frame masks per frame (a gigabyte, seconds):
# two frames are enough to show the dense case agrees too.
@pytest.mark.parametrize(("conf", "frames"), [(0.25, VAL_SETS), (0.001, VAL_SETS[:2])])
def test_detections_match_ultralytics(
    peer: Any, shipped_model: Path, usiigaci: Path, conf: float, frames: list[str]
) -> None:
    import cv2

    with OnnxRuntimeEngine(shipped_model) as engine:
        predictor = HostPipeline(engine, PostprocessConfig(conf=conf, iou=0.7, max_det=1000))
        for name in frames:
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
            # Match each detection to the peer's best-overlapping one (equal scores may be listed
            # in another order); the matching must be one-to-one.
            box_ious = box_iou(ours.boxes, theirs.boxes)
            match = box_ious.argmax(axis=1)
            assert len(set(match.tolist())) == n, f"{name}: detections do not pair up one-to-one"
            boxes = box_ious[np.arange(n), match]
            masks = np.array([_pair_iou(ours, i, theirs.masks[j]) for i, j in enumerate(match.tolist())])
            np.testing.assert_allclose(ours.scores, theirs.scores[match], atol=1e-4)
            assert boxes.min() >= 0.99, f"{name}: box IoU {boxes.min():.4f}"
            for i in np.flatnonzero(masks < 0.95):
                assert _differs_only_on_box_edges(ours, i, theirs.masks[match[i]]), (
                    f"{name}: detection {i} mask IoU {masks[i]:.4f} inside its box"
                )
