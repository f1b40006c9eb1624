"""COCO-style detection and segmentation metrics on cropped masks, in numpy.

The matching and averaging follow the COCO evaluation protocol (pycocotools' COCOeval with
area range 'all'): per image and class, detections in descending score order are matched
greedily to the unmatched ground truth of highest IoU at or above each threshold; AP is the
mean of the interpolated precision at 101 recall points; mAP50-95 averages IoU 0.50:0.05:0.95.
P and R are reported at the confidence that maximises F1 at IoU 0.5 (the convention of
YOLO training logs). A test checks these numbers against pycocotools on the same predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class Instances:
    """Boxes and cropped masks of one image (ground truth or predictions).

    Attributes:
        boxes: ``(N, 4)`` x0, y0, x1, y1.
        masks: N bool arrays, each placed at ``origins[i]`` (x, y) in the image.
        scores: ``(N,)`` (ones for ground truth).
        class_ids: ``(N,)``.
    """

    boxes: npt.NDArray[np.float64]
    masks: Sequence[npt.NDArray[np.bool_]]
    origins: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float64]
    class_ids: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, idx: npt.NDArray[np.intp]) -> Instances:
        return Instances(
            self.boxes[idx], [self.masks[i] for i in idx], self.origins[idx], self.scores[idx], self.class_ids[idx]
        )


def box_iou(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``(len(a), len(b))`` IoU of x0, y0, x1, y1 boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def mask_iou(a: Instances, b: Instances) -> npt.NDArray[np.float64]:
    """``(len(a), len(b))`` pixel IoU of cropped masks; only pairs whose mask extents overlap are computed."""
    out = np.zeros((len(a), len(b)))
    if len(a) == 0 or len(b) == 0:
        return out
    area_a = np.array([np.count_nonzero(m) for m in a.masks], dtype=np.float64)
    area_b = np.array([np.count_nonzero(m) for m in b.masks], dtype=np.float64)
    ext_a = _extents(a)
    ext_b = _extents(b)
    overlap = (
        (ext_a[:, None, 0] < ext_b[None, :, 2])
        & (ext_b[None, :, 0] < ext_a[:, None, 2])
        & (ext_a[:, None, 1] < ext_b[None, :, 3])
        & (ext_b[None, :, 1] < ext_a[:, None, 3])
    )
    for i, j in zip(*np.nonzero(overlap), strict=True):
        x0, y0 = max(ext_a[i, 0], ext_b[j, 0]), max(ext_a[i, 1], ext_b[j, 1])
        x1, y1 = min(ext_a[i, 2], ext_b[j, 2]), min(ext_a[i, 3], ext_b[j, 3])
        ma = a.masks[i][y0 - ext_a[i, 1] : y1 - ext_a[i, 1], x0 - ext_a[i, 0] : x1 - ext_a[i, 0]]
        mb = b.masks[j][y0 - ext_b[j, 1] : y1 - ext_b[j, 1], x0 - ext_b[j, 0] : x1 - ext_b[j, 0]]
        inter = float(np.count_nonzero(ma & mb))
        union = area_a[i] + area_b[j] - inter
        out[i, j] = inter / union if union > 0 else 0.0
    return out


def _extents(inst: Instances) -> npt.NDArray[np.int64]:
    ext = np.zeros((len(inst), 4), dtype=np.int64)
    for i, (m, (x, y)) in enumerate(zip(inst.masks, inst.origins.tolist(), strict=True)):
        ext[i] = (x, y, x + m.shape[1], y + m.shape[0])
    return ext


def match(ious: npt.NDArray[np.float64], thresholds: npt.NDArray[np.float64] = IOU_THRESHOLDS) -> npt.NDArray[np.bool_]:
    """``(T, n_det)`` true-positive flags; detections (rows of ``ious``) must be in descending score order."""
    n_det, n_gt = ious.shape
    tp = np.zeros((len(thresholds), n_det), dtype=bool)
    for t, thr in enumerate(thresholds):
        taken = np.zeros(n_gt, dtype=bool)
        limit = min(thr, 1 - 1e-10)
        for d in range(n_det):
            candidates = np.where(taken, -1.0, ious[d])
            g = int(np.argmax(candidates)) if n_gt else -1
            if g >= 0 and candidates[g] >= limit:
                taken[g] = True
                tp[t, d] = True
    return tp


@dataclass
class Accumulator:
    """Collects per-image matches of one class; computes AP, P and R over all images."""

    scores: list[npt.NDArray[np.float64]] = field(default_factory=list)
    tps: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    n_gt: int = 0
    n_gts: list[int] = field(default_factory=list)  # per image, so that images can be resampled

    def add(self, scores: npt.NDArray[np.float64], tp: npt.NDArray[np.bool_], n_gt: int) -> None:
        self.scores.append(scores)
        self.tps.append(tp)
        self.n_gt += n_gt
        self.n_gts.append(n_gt)

    def subset(self, images: Sequence[int]) -> Accumulator:
        """The matches of ``images`` (indices in the order added, repeats allowed): one bootstrap
        sample of the evaluated set. Matching is per image, so a sample's AP needs no re-matching."""
        picked = Accumulator()
        for i in images:
            picked.add(self.scores[i], self.tps[i], self.n_gts[i])
        return picked

    def _sorted(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        if not self.scores:
            return np.zeros(0), np.zeros((len(IOU_THRESHOLDS), 0), dtype=bool)
        scores = np.concatenate(self.scores)
        tp = np.concatenate(self.tps, axis=1)
        order = np.argsort(-scores, kind="mergesort")
        return scores[order], tp[:, order]

    def average_precision(self) -> npt.NDArray[np.float64]:
        """``(T,)`` AP at each IoU threshold (NaN when the class has no ground truth)."""
        if self.n_gt == 0:
            return np.full(len(IOU_THRESHOLDS), np.nan)
        _, tp = self._sorted()
        ap = np.zeros(len(IOU_THRESHOLDS))
        for t in range(len(IOU_THRESHOLDS)):
            tpc = np.cumsum(tp[t]).astype(np.float64)
            fpc = np.cumsum(~tp[t]).astype(np.float64)
            recall = tpc / self.n_gt
            precision = tpc / np.maximum(tpc + fpc, np.spacing(1))
            # Interpolated precision: the best precision at this recall or any higher one.
            precision = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision
            idx = np.searchsorted(recall, RECALL_POINTS, side="left")
            q = precision[np.minimum(idx, precision.size - 1)] if precision.size else np.zeros(idx.size)
            ap[t] = np.where(idx < precision.size, q, 0.0).mean()
        return ap

    def f1_at(self, conf: float) -> tuple[float, float, float]:
        """(P, R, F1) at IoU 0.5 of the detections scoring above ``conf``: the instance F1 of
        what the device reports at that operating confidence.

        Exact from matches made down to a lower confidence: greedy matching takes detections in
        descending score order, so the matches of those above ``conf`` never depend on the rest.
        """
        if self.n_gt == 0:
            return float("nan"), float("nan"), float("nan")
        scores, tp = self._sorted()
        kept = scores > conf
        n_tp = int(np.count_nonzero(tp[0][kept]))
        n_det = int(np.count_nonzero(kept))
        precision = n_tp / n_det if n_det else 0.0
        recall = n_tp / self.n_gt
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return precision, recall, f1

    def precision_recall_at_best_f1(self) -> tuple[float, float, float]:
        """(P, R, confidence) at the confidence maximising F1 at IoU 0.5."""
        if self.n_gt == 0:
            return float("nan"), float("nan"), float("nan")
        scores, tp = self._sorted()
        if scores.size == 0:
            return 0.0, 0.0, 0.0
        tpc = np.cumsum(tp[0])
        n = np.arange(1, scores.size + 1)
        precision, recall = tpc / n, tpc / self.n_gt
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-16)
        best = int(np.argmax(f1))
        return float(precision[best]), float(recall[best]), float(scores[best])


def map50_95(accumulators: Sequence[Accumulator]) -> float:
    """Mask (or box) mAP50-95 over the classes that have ground truth; 0 when none has."""
    aps = [a.average_precision().mean() for a in accumulators if a.n_gt > 0]
    return float(np.mean(aps)) if aps else 0.0


def image_matches(
    gt: Instances, pred: Instances, class_id: int, kind: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], int]:
    """Scores (descending), TP flags ``(T, n)`` and ground-truth count of one class in one image."""
    g = gt.select(np.nonzero(gt.class_ids == class_id)[0])
    p = pred.select(np.nonzero(pred.class_ids == class_id)[0])
    order = np.argsort(-p.scores, kind="mergesort")
    p = p.select(order)
    ious = box_iou(p.boxes, g.boxes) if kind == "box" else mask_iou(p, g)
    return p.scores, match(ious), len(g)
