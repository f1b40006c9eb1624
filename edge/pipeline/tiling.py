"""Tiled inference for frames larger than the model was trained on.

A model sees a whole frame letterboxed into its input. Trained on 1024-px frames at 640, it saw
cells at 0.625 of their pixel size; a 20-MP camera's 4096-px frame letterboxed the same way
shrinks them to 0.16, four times smaller than anything in training, and small cells vanish.
Cut into overlapping tiles of the training frame size, each tile is seen at the training scale.

Merging across seams, with every tile's masks in frame coordinates:

- a detection whose mask touches a tile edge that lies inside the frame is *cut*: the tile saw
  only part of that cell;
- whole detections come first (then by score); a detection whose mask overlaps one already kept
  by half of the smaller mask or more is the same cell seen by another tile, and is dropped.

So a cell lying in an overlap, whole in two tiles, is counted once; a cell cut by one tile's edge
is taken from the tile that saw it whole; and a cell larger than the overlap, cut in every tile,
is never lost: its highest-scoring piece is kept, and another piece is dropped when the two share
half of the smaller (they do while the cell is under twice the overlap; a longer one counts
twice). The default overlap, a quarter of the tile, is 256 px for 1024-px tiles, wider than the
largest Usiigaci cell.

A 16-bit frame is mapped to 8 bits once, over the whole frame, before it is cut: a stretch per
tile would give each tile its own contrast.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from cellseg.edge.engines.base import Engine
from cellseg.edge.errors import ConfigError
from cellseg.edge.pipeline.contract import FrameResult, Pipeline
from cellseg.edge.pipeline.intensity import to_uint8
from cellseg.edge.pipeline.measure import measure
from cellseg.edge.pipeline.model_info import ModelInfo
from cellseg.edge.pipeline.types import Detections, Frame

TileMode = Literal["auto", "on", "off"]

# Tiling starts when letterboxing the whole frame would shrink cells below this fraction of the
# size the model saw in training. Training scales frames by up to ±50 % (ultralytics' scale
# augmentation in the recipes), so a quarter smaller is well inside what the model knows.
AUTO_BELOW = 0.75
# Of the smaller mask, the share two detections must have in common to be one cell.
SAME_CELL_OVERLAP = 0.5


@dataclass(frozen=True)
class TileSettings:
    """How frames are tiled.

    Attributes:
        mode: ``auto`` (when the frame is more than 1/AUTO_BELOW times the training frame),
            ``on`` (every frame larger than one tile) or ``off``.
        tile_px: tile side in frame pixels (the frames the model was trained on).
        overlap_px: least overlap of neighbouring tiles, in frame pixels.
    """

    mode: TileMode
    tile_px: int
    overlap_px: int

    def __post_init__(self) -> None:
        if self.tile_px < 32:
            raise ConfigError(f"tile size must be at least 32 px, got {self.tile_px}")
        if not 0 <= self.overlap_px <= self.tile_px // 2:
            raise ConfigError(f"tile overlap must be between 0 and half the tile ({self.tile_px // 2} px), "
                              f"got {self.overlap_px}")  # fmt: skip

    @classmethod
    def resolve(
        cls,
        mode: TileMode,
        info: ModelInfo,
        *,
        tile_px: int | None = None,
        overlap_px: int | None = None,
        pixel_size_um: float | None = None,
    ) -> TileSettings | None:
        """Settings from configuration and the model's metadata; None when frames are never tiled.

        The tile is what covers the field of one training frame: the training frame size, scaled
        by the ratio of the pixel sizes when both are known (a camera with pixels three times
        finer than the training microscope's sees cells three times larger, so its tiles are three
        times wider, and a frame three times larger is not tiled at all). ``tile_px`` overrides it.

        Raises:
            ConfigError: tiling is ``on`` but neither the configuration nor the model says how
                large a tile is.
        """
        if mode == "off":
            return None
        size = tile_px
        trained = info.trained_frame_px
        if size is None and trained is not None:
            ratio = info.trained_pixel_um / pixel_size_um if info.trained_pixel_um and pixel_size_um else 1.0
            size = round(trained * ratio)
        if size is None:
            if mode == "on":
                raise ConfigError(
                    "tiling is on but the tile size is unknown: set the tile size, or use a model whose "
                    "metadata records its training frame size (trained_frame_px, written by cellseg export)"
                )
            return None
        return cls(mode, size, size // 4 if overlap_px is None else overlap_px)

    def applies_to(self, width: int, height: int) -> bool:
        longest = max(width, height)
        if longest <= self.tile_px:
            return False
        return self.mode == "on" or self.tile_px / longest < AUTO_BELOW


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start positions of tiles covering ``[0, length)``, spread evenly so that the last one ends at
    ``length`` and neighbours overlap by at least ``overlap``."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class Tile:
    x0: int
    y0: int
    x1: int
    y1: int


def plan_tiles(width: int, height: int, settings: TileSettings) -> list[Tile]:
    xs = tile_starts(width, settings.tile_px, settings.overlap_px)
    ys = tile_starts(height, settings.tile_px, settings.overlap_px)
    return [Tile(x, y, min(x + settings.tile_px, width), min(y + settings.tile_px, height)) for y in ys for x in xs]


def _cut_by_tile(det: Detections, tile: Tile, width: int, height: int) -> npt.NDArray[np.bool_]:
    """Which of a tile's detections (in tile coordinates) touch a tile edge inside the frame."""
    masks = det.cropped_masks()
    x0 = det.mask_origins[:, 0].astype(np.int64)
    y0 = det.mask_origins[:, 1].astype(np.int64)
    x1 = x0 + np.array([m.shape[1] for m in masks], dtype=np.int64)
    y1 = y0 + np.array([m.shape[0] for m in masks], dtype=np.int64)
    tw, th = tile.x1 - tile.x0, tile.y1 - tile.y0
    return (
        ((x0 <= 0) & (tile.x0 > 0))
        | ((y0 <= 0) & (tile.y0 > 0))
        | ((x1 >= tw) & (tile.x1 < width))
        | ((y1 >= th) & (tile.y1 < height))
    )


def _overlap_of_smaller(
    a: npt.NDArray[np.bool_], a_at: tuple[int, int], b: npt.NDArray[np.bool_], b_at: tuple[int, int]
) -> float:
    """Shared pixels of two placed masks over the smaller mask's pixels."""
    x0, y0 = max(a_at[0], b_at[0]), max(a_at[1], b_at[1])
    x1 = min(a_at[0] + a.shape[1], b_at[0] + b.shape[1])
    y1 = min(a_at[1] + a.shape[0], b_at[1] + b.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0.0
    sa = a[y0 - a_at[1] : y1 - a_at[1], x0 - a_at[0] : x1 - a_at[0]]
    sb = b[y0 - b_at[1] : y1 - b_at[1], x0 - b_at[0] : x1 - b_at[0]]
    smaller = min(int(np.count_nonzero(a)), int(np.count_nonzero(b)))
    return int(np.count_nonzero(sa & sb)) / smaller if smaller else 0.0


def merge_tiles(parts: list[tuple[Tile, Detections]], width: int, height: int) -> Detections:
    """One frame's detections from its tiles' (see the module's docstring for the rule)."""
    boxes, scores, classes, origins, cut = [], [], [], [], []
    masks: list[npt.NDArray[np.bool_]] = []
    for tile, det in parts:
        if len(det) == 0:
            continue
        boxes.append(det.boxes + np.array([tile.x0, tile.y0, tile.x0, tile.y0], dtype=np.float32))
        scores.append(det.scores)
        classes.append(det.class_ids)
        origins.append(det.mask_origins + np.array([tile.x0, tile.y0], dtype=np.int32))
        masks.extend(det.cropped_masks())
        cut.append(_cut_by_tile(det, tile, width, height))
    if not boxes:
        return Detections.empty(width, height)
    all_boxes, all_scores = np.concatenate(boxes), np.concatenate(scores)
    all_classes, all_origins, all_cut = np.concatenate(classes), np.concatenate(origins), np.concatenate(cut)
    kept: list[int] = []
    # A coarse grid of kept masks by the cells they touch, so each candidate is compared with
    # its neighbours only (a dense 20-MP frame has thousands of cells).
    cell = 256
    grid: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in np.lexsort((-all_scores, all_cut)).tolist():
        x, y = (int(v) for v in all_origins[i])
        h, w = masks[i].shape
        cells = [
            (cx, cy)
            for cx in range(x // cell, (x + w - 1) // cell + 1)
            for cy in range(y // cell, (y + h - 1) // cell + 1)
        ]
        near = {j for c in cells for j in grid[c] if all_classes[j] == all_classes[i]}
        if any(
            _overlap_of_smaller(masks[i], (x, y), masks[j], (int(all_origins[j, 0]), int(all_origins[j, 1])))
            >= SAME_CELL_OVERLAP
            for j in near
        ):
            continue
        kept.append(i)
        for c in cells:
            grid[c].append(i)
    order = sorted(kept, key=lambda i: -float(all_scores[i]))
    idx = np.asarray(order, dtype=np.intp)
    return Detections.from_masks(
        all_boxes[idx], all_scores[idx], all_classes[idx], all_origins[idx], [masks[i] for i in order],
        frame_width=width, frame_height=height,
    )  # fmt: skip


class TiledPipeline:
    """A pipeline that runs large frames tile by tile through another and merges the tiles; frames
    that need no tiling go straight through. Keeps the :class:`Pipeline` contract."""

    def __init__(self, inner: Pipeline, settings: TileSettings, pixel_size_um: float | None = None) -> None:
        self.inner = inner
        self.settings = settings
        self.pixel_size_um = pixel_size_um

    @property
    def engine(self) -> Engine:
        return self.inner.engine

    def __call__(self, frame: Frame, *, want_masks: bool = False) -> FrameResult:
        if not self.settings.applies_to(frame.width, frame.height):
            return self.inner(frame, want_masks=want_masks)
        t0 = time.perf_counter()
        pixels = to_uint8(frame.pixels, self.engine.info.mapping)
        t_mapped = time.perf_counter()
        latencies: dict[str, float] = defaultdict(float)
        parts = []
        for tile in plan_tiles(frame.width, frame.height, self.settings):
            crop = np.ascontiguousarray(pixels[tile.y0 : tile.y1, tile.x0 : tile.x1])
            result = self.inner(replace(frame, pixels=crop), want_masks=True)
            parts.append((tile, result.detections))
            for stage, ms in result.measurement.latencies_ms.items():
                latencies[stage] += ms
        t1 = time.perf_counter()
        detections = merge_tiles(parts, frame.width, frame.height)
        latencies["merge_tiles"] = (time.perf_counter() - t1) * 1e3
        latencies["map_frame"] = (t_mapped - t0) * 1e3
        m = measure(frame, detections, dict(latencies), self.pixel_size_um, self.engine.engine_id)
        return FrameResult(detections, m)

    def engine_rate(self, frame: Frame, count: int) -> float:
        return self.inner.engine_rate(frame, count)


def with_tiling(pipeline: Pipeline, settings: TileSettings | None, pixel_size_um: float | None = None) -> Pipeline:
    """``pipeline``, tiling the frames that need it when ``settings`` say so."""
    return pipeline if settings is None else TiledPipeline(pipeline, settings, pixel_size_um)
