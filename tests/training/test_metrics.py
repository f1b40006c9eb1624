"""Hand-checkable cases for the COCO-style metrics (the pycocotools agreement is in test_evaluate)."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.training.metrics import Accumulator, Instances, box_iou, image_matches, mask_iou


def _inst(boxes: list[tuple[int, int, int, int]], scores: list[float] | None = None) -> Instances:
    """Instances whose masks fill their integer boxes."""
    masks = [np.ones((y1 - y0, x1 - x0), dtype=bool) for x0, y0, x1, y1 in boxes]
    n = len(boxes)
    return Instances(
        boxes=np.asarray(boxes, dtype=np.float64).reshape(n, 4),
        masks=masks,
        origins=np.asarray([(b[0], b[1]) for b in boxes], dtype=np.int64).reshape(n, 2),
        scores=np.asarray(scores if scores is not None else [1.0] * n, dtype=np.float64),
        class_ids=np.zeros(n, dtype=np.int64),
    )


def test_box_and_mask_iou_of_half_overlapping_squares() -> None:
    a, b = _inst([(0, 0, 10, 10)]), _inst([(5, 0, 15, 10)])
    assert box_iou(a.boxes, b.boxes)[0, 0] == pytest.approx(50 / 150)
    assert mask_iou(a, b)[0, 0] == pytest.approx(50 / 150)
    assert mask_iou(a, _inst([(20, 20, 30, 30)]))[0, 0] == 0.0


def test_mask_iou_uses_pixels_not_boxes() -> None:
    ring = _inst([(0, 0, 10, 10)])
    ring.masks[0][2:8, 2:8] = False  # 100 - 36 = 64 px
    core = _inst([(2, 2, 8, 8)])  # exactly the hole
    assert box_iou(ring.boxes, core.boxes)[0, 0] == pytest.approx(36 / 100)
    assert mask_iou(ring, core)[0, 0] == 0.0


def _ap(gt: Instances, pred: Instances, kind: str = "mask") -> tuple[np.ndarray, tuple[float, float, float]]:
    acc = Accumulator()
    acc.add(*image_matches(gt, pred, 0, kind))
    return acc.average_precision(), acc.precision_recall_at_best_f1()


def test_perfect_predictions_score_one() -> None:
    gt = _inst([(0, 0, 10, 10), (20, 20, 30, 35)])
    ap, (p, r, _) = _ap(gt, _inst([(0, 0, 10, 10), (20, 20, 30, 35)], [0.9, 0.8]))
    np.testing.assert_allclose(ap, 1.0)
    assert (p, r) == (1.0, 1.0)


def test_a_higher_scoring_false_positive_halves_ap() -> None:
    gt = _inst([(0, 0, 10, 10)])
    pred = _inst([(50, 50, 60, 60), (0, 0, 10, 10)], [0.9, 0.8])
    ap, (p, r, conf) = _ap(gt, pred)
    np.testing.assert_allclose(ap, 0.5)
    assert (p, r, conf) == (0.5, 1.0, 0.8)


def test_a_missed_cell_caps_recall() -> None:
    gt = _inst([(0, 0, 10, 10), (20, 0, 30, 10)])
    ap, (p, r, _) = _ap(gt, _inst([(0, 0, 10, 10)]))
    # precision 1 up to recall 0.5, then nothing: 51 of 101 recall points.
    np.testing.assert_allclose(ap, 51 / 101)
    assert (p, r) == (1.0, 0.5)


def test_iou_thresholds_grade_a_loose_mask() -> None:
    gt = _inst([(0, 0, 10, 10)])
    pred = _inst([(0, 0, 10, 12)])  # IoU 100/120 = 0.833: a hit up to 0.80, a miss from 0.85
    ap, _ = _ap(gt, pred)
    np.testing.assert_allclose(ap, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0])


def test_one_prediction_cannot_match_two_cells() -> None:
    gt = _inst([(0, 0, 10, 10), (0, 0, 10, 10)])
    _, (p, r, _) = _ap(gt, _inst([(0, 0, 10, 10)]))
    assert r == 0.5 and p == 1.0
