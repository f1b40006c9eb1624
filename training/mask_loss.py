"""The segmentation loss computed inside each object's box: ultralytics' numbers, a fraction of the CPU time.

ultralytics' mask loss, for every foreground anchor (about ten per object), forms the predicted
mask over the whole prototype grid (256x256 at 1024 px), takes the binary cross-entropy with the
object's true mask there, zeroes every pixel outside the object's box, and divides the grid's mean
by the box's area (normalised to the image). Profiled on a 2-core Zen 3 training the nano at
1024 px, that was 30 % of a training step before its share of the backward pass, almost all of it
spent on pixels it then discards.

Everything outside the box is multiplied by zero, so the same sum can be taken over the box alone.
An object's anchors all carry that object's box (the assigner hands each anchor its object's box),
so the prototypes are cut once per object: a window of the prototype grid and of the true mask,
and one matrix product for all of its anchors. Objects are processed in chunks of similar window
size, padded to the chunk's largest window and anchor count; the padding has weight zero.

The pixels kept are exactly those ultralytics keeps: column ``c`` when ``x1 <= c < x2`` (and rows
alike) with the box in prototype pixels, compared in the box's own dtype. The sum of a box's
losses is divided by the whole grid's pixel count and then by the box's area, as the mean and the
division are in ultralytics; the batch's sum is divided by the number of foreground anchors by
ultralytics' caller. Only the order of the additions differs, so values and gradients agree to
float32 rounding (checked against ultralytics on real batches in the tests).

Written from the loss's definition; ultralytics' own code (AGPL) is not copied.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch.nn import functional

logger = logging.getLogger(__name__)

# The name a training manifest records for this loss.
MASK_LOSS = "in-box"

# The most logits (objects x anchors x window pixels, padding included) one chunk of objects may
# hold: 32 MB in float32. Objects go into chunks by growing window, so that padding stays small.
CHUNK_ELEMENTS = 8_000_000


def box_mask_loss(  # noqa: PLR0917  # ultralytics' criterion calls its mask loss with these, in this order
    fg_mask: torch.Tensor,
    masks: torch.Tensor,
    target_gt_idx: torch.Tensor,
    target_bboxes: torch.Tensor,
    batch_idx: torch.Tensor,
    proto: torch.Tensor,
    pred_masks: torch.Tensor,
    imgsz: torch.Tensor,
    *,
    overlap: bool,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The batch's mask loss over foreground anchors, as ultralytics' ``calculate_segmentation_loss``.

    Args:
        fg_mask: (B, N) foreground anchors.
        masks: true masks at the prototype size: (B, H, W) with object ``k`` of an image marked
            ``k + 1`` when ``overlap``, else (objects, H, W) in batch order.
        target_gt_idx: (B, N) the object each anchor is assigned, indexing its image's objects.
        target_bboxes: (B, N, 4) the assigned object's box, xyxy in input pixels.
        batch_idx: (objects, 1) each object's image.
        proto: (B, P, H, W) prototypes.
        pred_masks: (B, N, P) mask coefficients.
        imgsz: (2,) input height and width.
        overlap: the form of ``masks`` (ultralytics' ``overlap_mask``).
        chunk_elements: the most logits one chunk may hold.
    """
    batch, n_proto, h, w = proto.shape
    # The same normalisation as ultralytics, on the whole tensors, so boxes and areas are bit-equal.
    normalised = target_bboxes / imgsz[[1, 0, 1, 0]]
    area = (normalised[..., 2] - normalised[..., 0]) * (normalised[..., 3] - normalised[..., 1])
    grid_boxes = normalised * torch.tensor([w, h, w, h], device=proto.device)

    image, anchor = fg_mask.nonzero(as_tuple=True)
    gt = target_gt_idx[image, anchor].long()
    # One group per (image, object): its anchors share the object's box and true mask.
    key = image * (int(gt.max()) + 1) + gt
    groups, group_of = torch.unique(key, return_inverse=True)
    n_groups = len(groups)
    # Anchors by group, and each anchor's slot within its group; the first is the group's own.
    order = torch.argsort(group_of, stable=True)
    sizes = torch.bincount(group_of, minlength=n_groups)
    starts = sizes.cumsum(0) - sizes
    slot = torch.arange(len(order), device=order.device) - starts[group_of[order]]
    anchors_by_group = torch.full((n_groups, int(sizes.max())), -1, dtype=torch.long, device=order.device)
    anchors_by_group[group_of[order], slot] = order
    first = order[starts]
    group_image, group_gt = image[first], gt[first]
    box = grid_boxes[image[first], anchor[first]]  # (G, 4) in prototype pixels

    # The window of pixels kept: columns c with x1 <= c < x2 are [#(c < x1), #(c < x2)).
    cols = torch.arange(w, device=box.device, dtype=box.dtype)
    rows = torch.arange(h, device=box.device, dtype=box.dtype)
    x0 = (cols < box[:, 0:1]).sum(1)
    x1 = (cols < box[:, 2:3]).sum(1)
    y0 = (rows < box[:, 1:2]).sum(1)
    y1 = (rows < box[:, 3:4]).sum(1)
    width, height = (x1 - x0).clamp(min=0), (y1 - y0).clamp(min=0)

    coefficients = pred_masks[image, anchor]  # (A, P)
    anchor_area = area[image, anchor]  # (A,)
    proto_hwc = proto.permute(0, 2, 3, 1)  # indexing gathers (pixel, prototype) rows; no copy made here
    if not overlap:
        # Object k of image i is row (objects before image i) + k of masks.
        per_image = torch.bincount(batch_idx.view(-1).long(), minlength=batch)
        object_row = (per_image.cumsum(0) - per_image)[group_image] + group_gt

    total = proto.new_zeros(())
    by_size = torch.argsort(width * height)
    shapes = zip(height[by_size].tolist(), width[by_size].tolist(), sizes[by_size].tolist(), strict=True)
    for start, stop in _chunks(list(shapes), chunk_elements):
        chunk = by_size[start:stop]
        win_h, win_w = int(height[chunk].max()), int(width[chunk].max())
        k = int(sizes[chunk].max())
        if win_h == 0 or win_w == 0:
            continue  # boxes narrower than a pixel keep nothing, as in ultralytics
        dy = torch.arange(win_h, device=box.device)
        dx = torch.arange(win_w, device=box.device)
        r = (y0[chunk, None] + dy).clamp(max=h - 1)  # (C, win_h); padding rows repeat the last one
        c = (x0[chunk, None] + dx).clamp(max=w - 1)  # (C, win_w)
        inside = ((dy < height[chunk, None])[:, :, None] & (dx < width[chunk, None])[:, None, :]).flatten(1)
        img = group_image[chunk, None, None]
        feats = proto_hwc[img, r[:, :, None], c[:, None, :]].reshape(len(chunk), win_h * win_w, n_proto)
        if overlap:
            truth = (masks[img, r[:, :, None], c[:, None, :]] == (group_gt[chunk, None, None] + 1)).float()
        else:
            truth = masks[object_row[chunk, None, None], r[:, :, None], c[:, None, :]].float()
        truth = truth.reshape(len(chunk), 1, win_h * win_w)

        members = anchors_by_group[chunk, :k]  # (C, k); -1 pads groups with fewer anchors
        present = members >= 0
        members = members.clamp(min=0)
        logits = torch.bmm(coefficients[members], feats.transpose(1, 2))  # (C, k, win pixels)
        bce = functional.binary_cross_entropy_with_logits(logits, truth.expand_as(logits), reduction="none")
        per_anchor = (bce * inside[:, None, :]).sum(2) / (h * w) / anchor_area[members]
        total = total + torch.where(present, per_anchor, torch.zeros_like(per_anchor)).sum()

    if not bool(fg_mask.any(1).all()):
        # As ultralytics: an image without foreground keeps proto and coefficients in the graph.
        total = total + (proto * 0).sum() + (pred_masks * 0).sum()
    return total / fg_mask.sum()


def _chunks(shapes: list[tuple[int, int, int]], budget: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) runs of objects, given as (window height, window width, anchors):
    each run as long as its logits fit ``budget`` once padded to its tallest and widest window and
    its largest anchor count (a run has at least one object)."""
    runs: list[tuple[int, int]] = []
    start, most = 0, (0, 0, 0)
    for i, shape in enumerate(shapes):
        grown = (max(most[0], shape[0]), max(most[1], shape[1]), max(most[2], shape[2]))
        if i > start and (i + 1 - start) * grown[0] * grown[1] * grown[2] > budget:
            runs.append((start, i))
            start, grown = i, shape
        most = grown
    if shapes:
        runs.append((start, len(shapes)))
    return runs


class BoxMaskLoss:
    """An ultralytics callback that puts :func:`box_mask_loss` into the training model's criterion.

    It runs at each training epoch's start, because ultralytics builds the criterion lazily and may
    build it again (a resumed end-to-end head). Only the instance's method is replaced: the class,
    the EMA (validated and saved) and every other model keep ultralytics' loss, and checkpoints hold
    no criterion.
    """

    def register(self, model: Any) -> None:
        """Hook onto an ``ultralytics.YOLO`` before ``train``."""
        model.add_callback("on_train_epoch_start", self.attach)

    def attach(self, trainer: Any) -> None:
        network = getattr(trainer.model, "module", trainer.model)
        if getattr(network, "criterion", None) is None:
            network.criterion = network.init_criterion()
        for criterion in _segmentation_criteria(network.criterion):
            if not _patched(criterion):
                in_boxes = functools.partial(box_mask_loss, overlap=bool(criterion.overlap))
                criterion.calculate_segmentation_loss = in_boxes
                logger.info("mask loss: computed inside each object's box (%s)", type(criterion).__name__)


def _patched(criterion: Any) -> bool:
    own = criterion.__dict__.get("calculate_segmentation_loss")
    return isinstance(own, functools.partial) and own.func is box_mask_loss


def _segmentation_criteria(criterion: Any) -> list[Any]:
    """The criterion's segmentation losses (an end-to-end head holds two)."""
    parts = [criterion, getattr(criterion, "one2many", None), getattr(criterion, "one2one", None)]
    return [p for p in parts if p is not None and hasattr(type(p), "calculate_segmentation_loss")]
