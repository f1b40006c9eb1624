"""Raw YOLO-seg outputs -> Detections in frame coordinates (the numpy reference).

Steps: confidence filter, class-aware greedy NMS, then mask assembly for the kept detections
only, each computed only inside its own box at the frame's resolution:

    logits_i = coefficients_i . prototypes                      (prototype resolution)
    mask_i   = resample(logits_i) > logit(mask_threshold)       inside the box only

``resample`` is bilinear with half-pixel centres and edge clamping, in two steps: the
prototypes upsampled by the smallest factor (1, 2 or 4) that puts the letterbox edges on whole
pixels, the padding cropped, and the content resampled to the frame. A pixel belongs to a box
when its index lies in ``[x0, x1) x [y0, y1)``. A detection whose mask has no pixel is dropped
(it has no area to measure and is not counted). These are the semantics of ultralytics'
``retina_masks`` predictions, so the device agrees with the training framework's own
predictions pixel for pixel (checked by a test whenever ultralytics is installed); the CUDA
postprocess kernels implement the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cellseg.edge.engines.base import RawOutputs
from cellseg.edge.pipeline.model_info import PostprocessConfig
from cellseg.edge.pipeline.types import Detections, Letterbox

# Boxes of different classes are shifted this far apart so one NMS pass never lets a box
# suppress a box of another class; larger than any input side YOLO is run at.
_CLASS_OFFSET = 8192.0
# Candidates considered by NMS, highest scores first (bounds the worst case at conf ~ 0).
MAX_NMS_CANDIDATES = 30000

__all__ = ["MaskResampler", "PostprocessConfig", "Postprocessor", "assemble_masks", "nms", "pixel_spans", "postprocess"]


def nms(
    boxes: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], iou_threshold: float, max_keep: int
) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression.

    Args:
        boxes: ``(N, 4)`` x0, y0, x1, y1.
        scores: ``(N,)``, all > 0 (candidates above a confidence threshold).
    Returns:
        Indices of kept boxes, highest score first (ties: lower index first). A box is
        suppressed when its IoU with a kept, higher-scoring box is strictly greater than
        ``iou_threshold``.
    """
    import cv2

    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    # OpenCV's NMSBoxes is this exact greedy loop in C++ (stable sort by score, keep while
    # IoU <= threshold against every kept box): 10-20x faster than numpy at a few hundred
    # candidates, where it matters for a per-frame budget of a millisecond or two.
    xywh = np.empty(boxes.shape, dtype=np.float64)
    xywh[:, :2] = boxes[:, :2]
    xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    confidences = np.ascontiguousarray(scores, dtype=np.float32)
    # OpenCV's stubs say sequences; its binding takes (and is fastest with) arrays.
    kept = cv2.dnn.NMSBoxes(xywh, confidences, 0.0, float(iou_threshold))  # type: ignore[arg-type]
    return np.asarray(kept, dtype=np.intp).reshape(-1)[:max_keep]


def upsample_factor(letterbox: Letterbox, stride_x: float, stride_y: float) -> int:
    """Smallest factor f in (1, 2, 4) that puts every letterbox edge on a whole pixel of the
    prototypes upsampled f times (so the padding can be cropped exactly)."""
    lb = letterbox
    edges = [
        (lb.pad_x, stride_x),
        (lb.input_width - lb.pad_x - lb.resized_width, stride_x),
        (lb.pad_y, stride_y),
        (lb.input_height - lb.pad_y - lb.resized_height, stride_y),
    ]
    for f in (1, 2, 4):
        if all((edge * f / stride).is_integer() for edge, stride in edges):
            return f
    return 4


def _axis_weights(
    first: int, count: int, *, frame_size: int, resized: int, pad: int, stride: float, proto_size: int, factor: int
) -> tuple[int, npt.NDArray[np.float32]]:
    """Bilinear weights from prototype cells to ``count`` frame pixels starting at ``first``, along one axis.

    Two resamplings, both bilinear with half-pixel centres and edge clamping: prototypes to a
    grid ``factor`` times finer, then that grid's letterbox content (padding cropped) to the
    frame. Returns the first prototype index used and a ``(count, window)`` weight matrix.
    """
    crop0 = round(pad * factor / stride)
    size = round(resized * factor / stride)
    # Frame pixel centres -> the fine grid's cropped content.
    src = np.clip((np.arange(first, first + count) + 0.5) * (size / frame_size) - 0.5, 0.0, size - 1) + crop0
    lo = np.floor(src).astype(np.intp)
    hi = np.minimum(lo + 1, crop0 + size - 1)
    frac = (src - lo).astype(np.float32)
    u0 = int(lo[0])
    fine = _interp_matrix(lo - u0, hi - u0, frac, int(hi[-1]) - u0 + 1)
    # Fine-grid rows u0.. -> prototype cells.
    src1 = np.clip((np.arange(u0, u0 + fine.shape[1]) + 0.5) / factor - 0.5, 0.0, proto_size - 1)
    lo1 = np.floor(src1).astype(np.intp)
    hi1 = np.minimum(lo1 + 1, proto_size - 1)
    p0 = int(lo1[0])
    coarse = _interp_matrix(lo1 - p0, hi1 - p0, (src1 - lo1).astype(np.float32), int(hi1[-1]) - p0 + 1)
    return p0, fine @ coarse


def _interp_matrix(
    lo: npt.NDArray[np.intp], hi: npt.NDArray[np.intp], frac: npt.NDArray[np.float32], width: int
) -> npt.NDArray[np.float32]:
    weights = np.zeros((lo.size, width), dtype=np.float32)
    rows = np.arange(lo.size)
    # Two assignments, not one: where lo == hi (the clamped edge) the weights must add up to 1.
    weights[rows, lo] = 1.0 - frac
    weights[rows, hi] += frac
    return weights


@dataclass(frozen=True)
class AxisResampler:
    """Interpolation weights from prototype cells to every frame pixel along one axis.

    Attributes:
        weights: ``(frame_size, proto_size)``; row i holds pixel i's weights.
        first, stop: for each pixel, the range of prototype cells with a non-zero weight
            (non-decreasing along the axis, so a run of pixels needs ``first[a]:stop[b - 1]``).
    """

    weights: npt.NDArray[np.float32]
    first: npt.NDArray[np.intp]
    stop: npt.NDArray[np.intp]

    @classmethod
    def build(
        cls, *, frame_size: int, resized: int, pad: int, stride: float, proto_size: int, factor: int
    ) -> AxisResampler:
        p0, part = _axis_weights(
            0, frame_size, frame_size=frame_size, resized=resized, pad=pad, stride=stride, proto_size=proto_size,
            factor=factor,
        )  # fmt: skip
        weights = np.zeros((frame_size, proto_size), dtype=np.float32)
        weights[:, p0 : p0 + part.shape[1]] = part
        nonzero = weights != 0
        first = np.argmax(nonzero, axis=1)
        stop = proto_size - np.argmax(nonzero[:, ::-1], axis=1)
        return cls(weights, first, stop)

    def windows(
        self, start: npt.NDArray[np.intp], end: npt.NDArray[np.intp]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """For runs of pixels ``start[i]:end[i]`` (non-empty), the prototype cells they read:
        ``first[i]:stop[i]``."""
        return self.first[start], self.stop[end - 1]


@dataclass(frozen=True)
class MaskResampler:
    """Both axes' weights for one frame geometry; built once and reused while the geometry holds."""

    x: AxisResampler
    y: AxisResampler

    @classmethod
    def build(cls, letterbox: Letterbox, proto_height: int, proto_width: int) -> MaskResampler:
        lb = letterbox
        stride_x, stride_y = lb.input_width / proto_width, lb.input_height / proto_height
        factor = upsample_factor(lb, stride_x, stride_y)
        return cls(
            x=AxisResampler.build(frame_size=lb.frame_width, resized=lb.resized_width, pad=lb.pad_x, stride=stride_x,
                                  proto_size=proto_width, factor=factor),
            y=AxisResampler.build(frame_size=lb.frame_height, resized=lb.resized_height, pad=lb.pad_y,
                                  stride=stride_y, proto_size=proto_height, factor=factor),
        )  # fmt: skip


class Postprocessor:
    """:func:`postprocess` with the per-geometry resampling weights cached across frames."""

    def __init__(self, config: PostprocessConfig) -> None:
        self.config = config
        self._key: tuple[Letterbox, int, int] | None = None
        self._resampler: MaskResampler | None = None

    def __call__(self, raw: RawOutputs, letterbox: Letterbox) -> Detections:
        key = (letterbox, raw.prototypes.shape[1], raw.prototypes.shape[2])
        if self._resampler is None or key != self._key:
            self._resampler = MaskResampler.build(letterbox, key[1], key[2])
            self._key = key
        return postprocess(raw, letterbox, self.config, self._resampler)


def to_frame_boxes(boxes: npt.NDArray[np.float32], lb: Letterbox) -> npt.NDArray[np.float32]:
    """Input-pixel ``x0, y0, x1, y1`` -> frame pixels, clipped to the frame."""
    frame_boxes: npt.NDArray[np.float32] = (
        (boxes - np.array([lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y], np.float32))
        / np.array([lb.scale_x, lb.scale_y, lb.scale_x, lb.scale_y], np.float32)
    ).astype(np.float32)
    frame_boxes[:, [0, 2]] = np.clip(frame_boxes[:, [0, 2]], 0, lb.frame_width)
    frame_boxes[:, [1, 3]] = np.clip(frame_boxes[:, [1, 3]], 0, lb.frame_height)
    return frame_boxes


def pixel_spans(frame_boxes: npt.NDArray[np.float32], lb: Letterbox) -> npt.NDArray[np.intp]:
    """``(N, 4)`` ``c0, c1, r0, r1``: the frame pixels whose index lies in ``[x0, x1) x [y0, y1)``
    (empty, ``c1 <= c0`` or ``r1 <= r0``, for a box thinner than a pixel)."""
    edges = np.ceil(frame_boxes.astype(np.float64)).astype(np.intp)
    spans = np.empty((frame_boxes.shape[0], 4), dtype=np.intp)
    spans[:, 0] = np.maximum(edges[:, 0], 0)
    spans[:, 1] = np.minimum(edges[:, 2], lb.frame_width)
    spans[:, 2] = np.maximum(edges[:, 1], 0)
    spans[:, 3] = np.minimum(edges[:, 3], lb.frame_height)
    return spans


def assemble_masks(
    coefs: npt.NDArray[np.float32],
    protos: npt.NDArray[np.float32],
    spans: npt.NDArray[np.intp],
    resampler: MaskResampler,
    logit_threshold: float,
) -> tuple[list[npt.NDArray[np.bool_]], npt.NDArray[np.bool_]]:
    """Each detection's mask over its pixel span: ``resample(coefs_i . protos) > threshold``.

    Args:
        coefs: ``(N, nm)`` mask coefficients.
        protos: ``(nm, ph, pw)`` prototypes.
        spans: ``(N, 4)`` non-empty ``c0, c1, r0, r1`` pixel spans.
    Returns:
        N boolean ``(r1 - r0, c1 - c0)`` masks and ``(N,)`` whether each has a pixel.

    One detection at a time, each within its own window: measured in the pipeline (right after
    inference, when the CPU caches hold the engine's data, not ours), this beats batching
    detections into padded arrays, whose few-MB temporaries miss the cache.
    """
    nm = protos.shape[0]
    px0, px1 = resampler.x.windows(spans[:, 0], spans[:, 1])
    py0, py1 = resampler.y.windows(spans[:, 2], spans[:, 3])
    wx_all, wy_all = resampler.x.weights, resampler.y.weights
    masks: list[npt.NDArray[np.bool_]] = []
    filled = np.zeros(len(spans), dtype=np.bool_)
    rows = zip(spans.tolist(), px0.tolist(), px1.tolist(), py0.tolist(), py1.tolist(), strict=True)
    for i, ((c0, c1, r0, r1), x0, x1, y0, y1) in enumerate(rows):
        logits = (coefs[i] @ protos[:, y0:y1, x0:x1].reshape(nm, -1)).reshape(y1 - y0, x1 - x0)
        mask = (wy_all[r0:r1, y0:y1] @ logits @ wx_all[c0:c1, x0:x1].T) > logit_threshold
        masks.append(mask)
        filled[i] = mask.any()
    return masks, filled


def decode_and_suppress(
    xywh: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float32],
    class_ids: npt.NDArray[np.int32],
    config: PostprocessConfig,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.intp]]:
    """Candidates' centre boxes -> the corner boxes NMS keeps (input pixels) and their indices.
    NMS runs per class: each class's boxes are shifted apart by a large offset first, so boxes
    of different classes never suppress each other. Shared by the host and CUDA postprocess."""
    boxes = np.empty_like(xywh)
    boxes[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
    boxes[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
    offset = (class_ids.astype(np.float32) * _CLASS_OFFSET)[:, None]
    kept = nms(boxes + offset, scores, config.iou, config.max_det)
    return boxes[kept], kept


def postprocess(
    raw: RawOutputs, letterbox: Letterbox, config: PostprocessConfig, resampler: MaskResampler | None = None
) -> Detections:
    """Decode one image's raw outputs into Detections in frame pixels.

    ``resampler`` must have been built for this letterbox and prototype size (see
    :class:`Postprocessor`, which caches it); one is built when it is not given.
    """
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

    cls = class_ids[candidates]
    boxes, kept = decode_and_suppress(preds[:4, candidates].T, scores[candidates], cls, config)
    det_scores, cls = scores[candidates[kept]], cls[kept]
    coefs = preds[4 + nc :, candidates[kept]].T  # (n, nm)

    lb = letterbox
    frame_boxes = to_frame_boxes(boxes, lb)

    resampler = resampler or MaskResampler.build(lb, ph, pw)
    # sigmoid(logit) > t  <=>  logit > log(t / (1 - t)): threshold the interpolated logits.
    logit_threshold = math.log(config.mask_threshold / (1.0 - config.mask_threshold))
    spans = pixel_spans(frame_boxes, lb)
    # A box thinner than a pixel holds no pixel: nothing to measure.
    rows = np.nonzero((spans[:, 1] > spans[:, 0]) & (spans[:, 3] > spans[:, 2]))[0]
    masks, filled = assemble_masks(coefs[rows], protos, spans[rows], resampler, logit_threshold)
    # A detection without a single mask pixel is not a cell (ultralytics drops these too).
    rows = rows[filled]
    masks = [m for m, keep in zip(masks, filled.tolist(), strict=True) if keep]
    origins = np.ascontiguousarray(spans[rows][:, [0, 2]], dtype=np.int32)
    return Detections.from_masks(
        boxes=frame_boxes[rows].astype(np.float32),
        scores=det_scores[rows].astype(np.float32),
        class_ids=cls[rows].astype(np.int32),
        mask_origins=origins,
        masks=masks,
        frame_width=lb.frame_width,
        frame_height=lb.frame_height,
    )
