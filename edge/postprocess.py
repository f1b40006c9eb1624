"""Raw YOLO-seg outputs -> Detections in frame coordinates (the numpy reference).

Steps: confidence filter, class-aware greedy NMS, mask assembly for the kept detections only,
each computed only inside its own box at the frame's resolution:

    mask_i(pixel) = bilinear( sigmoid(coefficients_i . prototypes) )(pixel centre) > threshold

The bilinear sampling maps each frame pixel centre through the letterbox to prototype
coordinates with half-pixel centres and edge clamping, which is what upsampling the
prototype-resolution masks to the input and then to the frame does in one step. The CUDA
postprocess kernels implement the same semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cellseg.edge.engine import RawOutputs
from cellseg.edge.model_info import Thresholds
from cellseg.edge.types import Detections, Letterbox

# Boxes of different classes are shifted this far apart so one NMS pass never lets a box
# suppress a box of another class; larger than any input side YOLO is run at.
_CLASS_OFFSET = 8192.0
# Candidates considered by NMS, highest scores first (bounds the worst case at conf ~ 0).
MAX_NMS_CANDIDATES = 30000


@dataclass(frozen=True)
class PostprocessConfig:
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 1000
    mask_threshold: float = 0.5

    @classmethod
    def from_thresholds(cls, t: Thresholds) -> PostprocessConfig:
        return cls(conf=t.conf, iou=t.iou, max_det=t.max_det, mask_threshold=t.mask_threshold)


def nms(
    boxes: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], iou_threshold: float, max_keep: int
) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression.

    Args:
        boxes: ``(N, 4)`` x0, y0, x1, y1.
        scores: ``(N,)``.
    Returns:
        Indices of kept boxes, highest score first. A box is suppressed when its IoU with a
        kept, higher-scoring box is strictly greater than ``iou_threshold``.
    """
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order].astype(np.float32)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    alive = np.ones(len(order), dtype=bool)
    keep: list[int] = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(i)
        if len(keep) >= max_keep:
            break
        rest = np.nonzero(alive[i + 1 :])[0] + i + 1
        if rest.size == 0:
            break
        b = boxes[rest]
        iw = np.clip(np.minimum(b[:, 2], boxes[i, 2]) - np.maximum(b[:, 0], boxes[i, 0]), 0, None)
        ih = np.clip(np.minimum(b[:, 3], boxes[i, 3]) - np.maximum(b[:, 1], boxes[i, 1]), 0, None)
        inter = iw * ih
        iou = inter / (areas[rest] + areas[i] - inter + 1e-9)
        alive[rest[iou > iou_threshold]] = False
    return order[np.asarray(keep, dtype=np.intp)]


def _bilinear_weights(
    first: int, count: int, *, scale: float, pad: float, stride: float, size: int
) -> tuple[int, npt.NDArray[np.float32]]:
    """Interpolation matrix from a prototype window to ``count`` frame pixels from ``first``.

    Returns the window's first prototype index and a ``(count, window)`` weight matrix.
    """
    centres = (np.arange(first, first + count, dtype=np.float64) + 0.5) * scale + pad
    src = np.clip(centres / stride - 0.5, 0.0, size - 1)
    lo = np.floor(src).astype(np.intp)
    hi = np.minimum(lo + 1, size - 1)
    frac = (src - lo).astype(np.float32)
    start = int(lo[0])
    window = int(hi[-1]) - start + 1
    weights = np.zeros((count, window), dtype=np.float32)
    rows = np.arange(count)
    np.add.at(weights, (rows, lo - start), 1.0 - frac)
    np.add.at(weights, (rows, hi - start), frac)
    return start, weights


def postprocess(raw: RawOutputs, letterbox: Letterbox, config: PostprocessConfig) -> Detections:
    """Decode one image's raw outputs into Detections in frame pixels."""
    preds, protos = raw.predictions, raw.prototypes
    nm, ph, pw = protos.shape
    nc = preds.shape[0] - 4 - nm
    class_scores = preds[4 : 4 + nc]
    if nc == 1:
        scores, class_ids = class_scores[0], np.zeros(preds.shape[1], dtype=np.int32)
    else:
        class_ids = class_scores.argmax(axis=0).astype(np.int32)
        scores = class_scores[class_ids, np.arange(preds.shape[1])]
    candidates = np.nonzero(scores > config.conf)[0]
    if candidates.size > MAX_NMS_CANDIDATES:
        candidates = candidates[np.argsort(-scores[candidates], kind="stable")[:MAX_NMS_CANDIDATES]]
    if candidates.size == 0:
        return Detections.empty(letterbox.frame_width, letterbox.frame_height)

    xywh = preds[:4, candidates].T
    boxes = np.empty_like(xywh)
    boxes[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
    boxes[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
    cls = class_ids[candidates]
    offset = (cls.astype(np.float32) * _CLASS_OFFSET)[:, None]
    kept = nms(boxes + offset, scores[candidates], config.iou, config.max_det)
    boxes, det_scores, cls = boxes[kept], scores[candidates[kept]], cls[kept]
    coefs = preds[4 + nc :, candidates[kept]].T  # (n, nm)

    # Input pixels -> frame pixels, clipped to the frame.
    lb = letterbox
    frame_boxes = (boxes - np.array([lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y], np.float32)) / np.float32(lb.scale)
    frame_boxes[:, [0, 2]] = np.clip(frame_boxes[:, [0, 2]], 0, lb.frame_width)
    frame_boxes[:, [1, 3]] = np.clip(frame_boxes[:, [1, 3]], 0, lb.frame_height)

    stride_x, stride_y = lb.input_width / pw, lb.input_height / ph
    masks: list[npt.NDArray[np.bool_]] = []
    origins = np.zeros((len(kept), 2), dtype=np.int32)
    keep_rows: list[int] = []
    for i, (x0, y0, x1, y1) in enumerate(frame_boxes.tolist()):
        # Frame pixels whose centre lies inside the box.
        c0, c1 = math.ceil(x0 - 0.5), math.floor(x1 - 0.5) + 1
        r0, r1 = math.ceil(y0 - 0.5), math.floor(y1 - 0.5) + 1
        c0, r0 = max(c0, 0), max(r0, 0)
        c1, r1 = min(c1, lb.frame_width), min(r1, lb.frame_height)
        if c1 <= c0 or r1 <= r0:
            continue  # a box thinner than a pixel covers no pixel centre: no cell to measure
        px0, wx = _bilinear_weights(c0, c1 - c0, scale=lb.scale, pad=lb.pad_x, stride=stride_x, size=pw)
        py0, wy = _bilinear_weights(r0, r1 - r0, scale=lb.scale, pad=lb.pad_y, stride=stride_y, size=ph)
        window = protos[:, py0 : py0 + wy.shape[1], px0 : px0 + wx.shape[1]].reshape(nm, -1)
        logits = (coefs[i] @ window).reshape(wy.shape[1], wx.shape[1])
        probs = 1.0 / (1.0 + np.exp(-logits))
        masks.append((wy @ probs @ wx.T) > config.mask_threshold)
        origins[i] = (c0, r0)
        keep_rows.append(i)
    rows = np.asarray(keep_rows, dtype=np.intp)
    return Detections(
        boxes=frame_boxes[rows].astype(np.float32),
        scores=det_scores[rows].astype(np.float32),
        class_ids=cls[rows].astype(np.int32),
        mask_origins=origins[rows],
        masks=masks,
        frame_width=lb.frame_width,
        frame_height=lb.frame_height,
    )
