"""Hand-checkable postprocess cases on crafted raw outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellseg.edge.engines.base import RawOutputs
from cellseg.edge.pipeline.measure import measure
from cellseg.edge.pipeline.postprocess import (
    MaskResampler,
    PostprocessConfig,
    nms,
    pixel_spans,
    postprocess,
    to_frame_boxes,
)
from cellseg.edge.pipeline.preprocess import letterbox_geometry
from cellseg.edge.pipeline.types import Frame, Letterbox


def _raw(dets: list[tuple[float, float, float, float, list[float], float]], nc: int = 1, size: int = 64) -> RawOutputs:
    """Raw outputs with one anchor per (cx, cy, w, h, class scores, mask coefficient), padded with empty anchors.

    One constant prototype: a coefficient of +10 fills the box, -10 leaves it empty.
    """
    anchors = 84
    preds = np.zeros((4 + nc + 1, anchors), dtype=np.float32)
    for i, (cx, cy, w, h, scores, coef) in enumerate(dets):
        preds[:4, i] = (cx, cy, w, h)
        preds[4 : 4 + nc, i] = scores
        preds[4 + nc, i] = coef
    protos = np.ones((1, size // 4, size // 4), dtype=np.float32)
    return RawOutputs(preds, protos)


def test_nms_keeps_overlapping_boxes_below_the_threshold() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10.2], [30, 30, 40, 40]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.95, 0.1], dtype=np.float32)
    # Box 2 scores highest. IoU(2, 0) = 100/102: box 0 goes. IoU(2, 1) = 82.8/119.2 = 0.695 < 0.7: box 1 stays,
    # but not at a threshold of 0.5.
    np.testing.assert_array_equal(nms(boxes, scores, 0.7, 100), [2, 1, 3])
    np.testing.assert_array_equal(nms(boxes, scores, 0.5, 100), [2, 3])
    np.testing.assert_array_equal(nms(boxes, scores, 0.7, 2), [2, 1])


def test_boxes_and_masks_map_back_through_the_letterbox() -> None:
    # A 128x64 frame in a 64x64 input: scale 0.5, 16 rows of padding on top.
    g = letterbox_geometry(128, 64, 64, 64)
    raw = _raw([(20, 36, 20, 20, [0.9], 10.0)])
    det = postprocess(raw, g, PostprocessConfig(conf=0.25))
    assert len(det) == 1
    np.testing.assert_allclose(det.boxes[0], [20, 20, 60, 60])
    assert tuple(det.mask_origins[0]) == (20, 20)
    assert det.masks[0].shape == (40, 40) and det.masks[0].all()


def test_a_mask_at_the_frame_edge_is_clipped_to_the_frame() -> None:
    g = letterbox_geometry(64, 64, 64, 64)
    raw = _raw([(2, 30, 10, 10, [0.9], 10.0), (62, 63, 8, 8, [0.8], 10.0)])
    det = postprocess(raw, g, PostprocessConfig(conf=0.25))
    assert len(det) == 2
    np.testing.assert_allclose(det.boxes[0], [0, 25, 7, 35])
    assert tuple(det.mask_origins[0]) == (0, 25) and det.masks[0].shape == (10, 7)
    np.testing.assert_allclose(det.boxes[1], [58, 59, 64, 64])
    x, y = det.mask_origins[1]
    assert x + det.masks[1].shape[1] == 64 and y + det.masks[1].shape[0] == 64
    m = measure(Frame(np.zeros((64, 64), np.uint8)), det)
    assert m.count == 2 and m.confluence_pct == pytest.approx(100 * (70 + 30) / 4096)


def test_confluence_counts_overlapping_cells_once() -> None:
    g = letterbox_geometry(64, 64, 64, 64)
    raw = _raw([(20, 20, 20, 20, [0.9], 10.0), (25, 20, 20, 20, [0.8], 10.0)])  # IoU 300/500 = 0.6
    det = postprocess(raw, g, PostprocessConfig(conf=0.25, iou=0.7))
    m = measure(Frame(np.zeros((64, 64), np.uint8)), det)
    assert m.count == 2 and list(m.areas_px) == [400, 400]
    assert m.confluence_pct == pytest.approx(100 * 500 / 4096)


def test_empty_frame() -> None:
    g = letterbox_geometry(64, 64, 64, 64)
    det = postprocess(_raw([(20, 20, 10, 10, [0.1], 10.0)]), g, PostprocessConfig(conf=0.25))
    assert len(det) == 0
    m = measure(Frame(np.zeros((64, 64), np.uint8)), det)
    assert (m.count, m.confluence_pct, m.areas_px.shape) == (0, 0.0, (0,))


@pytest.mark.parametrize("mask_threshold", [0.5, 0.3])
def test_a_detection_without_mask_pixels_is_not_a_cell(mask_threshold: float) -> None:
    # Also below a threshold of 0.5, where a logit of 0 passes: an empty mask stays empty.
    g = letterbox_geometry(64, 64, 64, 64)
    raw = _raw([(20, 20, 8, 8, [0.9], -10.0), (40, 40, 12, 12, [0.8], 10.0)])
    det = postprocess(raw, g, PostprocessConfig(conf=0.25, mask_threshold=mask_threshold))
    assert len(det) == 1 and det.scores[0] == pytest.approx(0.8) and det.masks[0].all()


def test_classes_do_not_suppress_each_other() -> None:
    g = letterbox_geometry(64, 64, 64, 64)
    raw = _raw([(20, 20, 10, 10, [0.9, 0.0], 10.0), (20, 20, 10, 10, [0.0, 0.8], 10.0)], nc=2)
    det = postprocess(raw, g, PostprocessConfig(conf=0.25))
    assert list(det.class_ids) == [0, 1]


def test_max_det_into_the_thousands() -> None:
    g = letterbox_geometry(640, 640, 640, 640)
    n = 1600  # a 40x40 grid of small cells, all distinct
    preds = np.zeros((4 + 1 + 1, 8400), dtype=np.float32)
    ys, xs = np.divmod(np.arange(n), 40)
    preds[0, :n], preds[1, :n] = xs * 16 + 8, ys * 16 + 8
    preds[2, :n] = preds[3, :n] = 10
    preds[4, :n] = np.linspace(0.9, 0.5, n)
    preds[5, :n] = 10.0
    raw = RawOutputs(preds, np.ones((1, 160, 160), np.float32))
    assert len(postprocess(raw, g, PostprocessConfig(conf=0.25, max_det=300))) == 300
    det = postprocess(raw, g, PostprocessConfig(conf=0.25, max_det=5000))
    assert len(det) == n
    assert np.all(np.diff(det.scores) <= 0)


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """NMS as the definition reads, one pair at a time."""

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))

    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda k: (-scores[k], k)):
        if all(iou(boxes[i], boxes[k]) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("max_keep", [10_000, 50])
def test_nms_is_the_greedy_definition_on_a_dense_grid_with_ties(max_keep: int) -> None:
    grid = np.stack(np.meshgrid(np.arange(0, 300, 12.0), np.arange(0, 300, 12.0)), -1).reshape(-1, 2)
    boxes = np.concatenate([grid, grid + 20.0], axis=1).astype(np.float32)  # neighbours overlap by 8/20
    boxes = np.concatenate([boxes, boxes + 3.0])  # and each has a shifted twin (IoU 0.57)
    scores = np.round(np.random.default_rng(3).uniform(0.3, 1.0, len(boxes)), 2).astype(np.float32)  # many ties
    want = _greedy_nms(boxes, scores, 0.5)[:max_keep]
    np.testing.assert_array_equal(nms(boxes, scores, 0.5, max_keep), want)
    assert 0 < len(want) < len(boxes)
    assert len(nms(boxes[:0], scores[:0], 0.5, max_keep)) == 0


@pytest.fixture(scope="module")
def real_outputs(usiigaci: Path, shipped_model: Path) -> list[tuple[RawOutputs, Letterbox]]:
    from cellseg.edge.capture.imageio import read_image
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
    from cellseg.edge.pipeline.preprocess import Preprocessor

    frame = read_image(usiigaci / "val" / "set48" / "raw.tif")
    out = []
    with OnnxRuntimeEngine(shipped_model, threads=2) as engine:
        pre = Preprocessor(engine.info.input_width, engine.info.input_height, engine.info.mapping)
        # The whole frame, and an odd crop whose cells are cut by every edge of the frame.
        for pixels in (frame, frame[301:818, 207:540]):
            tensor, lb = pre(Frame(pixels))
            raw = engine.infer(tensor)
            out.append((RawOutputs(raw.predictions.copy(), raw.prototypes.copy()), lb))
    return out


@pytest.mark.parametrize(("conf", "mask_threshold"), [(0.25, 0.5), (0.01, 0.3), (0.25, 0.7)])
def test_windowed_masks_equal_each_cell_resampled_from_the_whole_prototype_plane(
    real_outputs: list[tuple[RawOutputs, Letterbox]], conf: float, mask_threshold: float
) -> None:
    """The windowed assembly against the plainest formula: every cell's logits over the whole
    160x160 prototype plane, resampled to its pixels with the full weight matrices."""
    config = PostprocessConfig(conf=conf, mask_threshold=mask_threshold, max_det=3000)
    threshold = np.log(mask_threshold / (1 - mask_threshold))
    for raw, lb in real_outputs:
        det = postprocess(raw, lb, config)
        resampler = MaskResampler.build(lb, *raw.prototypes.shape[1:])
        assert len(det) > 20
        spans = pixel_spans(det.boxes, lb)
        # Each detection's anchor: the one with its score and its box.
        xywh = raw.predictions[:4].T
        boxes = to_frame_boxes(np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1), lb)
        anchors = [int(np.flatnonzero((raw.predictions[4] == s) & np.all(np.abs(boxes - b) < 1e-3, axis=1))[0])
                   for s, b in zip(det.scores, det.boxes, strict=True)]  # fmt: skip
        coefs = raw.predictions[5:, anchors].T
        mismatched = total = 0
        for (c0, c1, r0, r1), coef, origin, mask in zip(spans, coefs, det.mask_origins, det.masks, strict=True):
            plane = np.tensordot(coef, raw.prototypes, axes=1)
            want = resampler.y.weights[r0:r1] @ plane @ resampler.x.weights[c0:c1].T > threshold
            assert tuple(origin) == (c0, r0) and mask.shape == want.shape
            mismatched += int((mask != want).sum())
            total += want.size
        # Sums over a wider window may round a logit sitting on the threshold the other way.
        assert mismatched <= 1e-5 * total, (mismatched, total)
