"""The validated types passed between the stages of the device pipeline.

    Frame -> (preprocess) -> Letterbox + tensor -> (engine) -> raw outputs
          -> (postprocess) -> Detections -> (measure) -> Measurement

Each checks its shapes and dtypes in ``__post_init__`` and names the expected ones in its
error, so a backend that returns something odd fails at the seam, not three stages later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.errors import ContractError, FrameError


@dataclass(frozen=True)
class Frame:
    """One image from a source.

    Attributes:
        pixels: ``(H, W)`` grey or ``(H, W, 3)`` BGR, dtype uint8 or uint16.
        source: where it came from (file path, camera name), for reports.
        timestamp: wall-clock seconds since the epoch when it was read (processing time).
        seq: sequence number within its source.
        acquired_at: seconds since the epoch when it was taken (image metadata, file name or
            mtime for files; the capture for cameras), None when unknown.
        acquired_from: where ``acquired_at`` was read (see :mod:`cellseg.edge.capture.acquisition`).
    """

    pixels: npt.NDArray[Any]
    source: str = ""
    timestamp: float = 0.0
    seq: int = 0
    acquired_at: float | None = None
    acquired_from: str = ""

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, np.ndarray):
            raise FrameError(f"Frame.pixels must be a numpy array, got {type(p).__name__}")
        if p.dtype not in (np.uint8, np.uint16):
            raise FrameError(f"Frame.pixels must be uint8 or uint16, got {p.dtype}")
        if not (p.ndim == 2 or (p.ndim == 3 and p.shape[2] == 3)):
            raise FrameError(f"Frame.pixels must be (H, W) or (H, W, 3), got {p.shape}")
        if p.shape[0] < 2 or p.shape[1] < 2:
            raise FrameError(f"Frame.pixels is too small: {p.shape}")

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass(frozen=True)
class Letterbox:
    """How a frame was fitted into the engine input: ``input = frame * (scale_x, scale_y) + (pad_x, pad_y)``.

    Attributes:
        scale: the fit factor; the frame is resized to ``round(side * scale)`` pixels per side.
        pad_x, pad_y: left and top padding in input pixels.
        frame_width, frame_height: the original frame size.
        input_width, input_height: the engine input size.
    """

    scale: float
    pad_x: int
    pad_y: int
    frame_width: int
    frame_height: int
    input_width: int
    input_height: int

    @property
    def resized_width(self) -> int:
        return max(round(self.frame_width * self.scale), 1)

    @property
    def resized_height(self) -> int:
        return max(round(self.frame_height * self.scale), 1)

    # The resize maps the frame onto a whole number of pixels, so each axis' effective scale is
    # resized / frame, which differs from ``scale`` by up to half a pixel over the frame
    # (1022 rows -> 639, not 638.75). Coordinates mapped back to the frame use these.
    @property
    def scale_x(self) -> float:
        return self.resized_width / self.frame_width

    @property
    def scale_y(self) -> float:
        return self.resized_height / self.frame_height


@dataclass(frozen=True)
class Detections:
    """Instances found in one frame, in the frame's own pixel coordinates: the one result type
    of every backend's postprocess (numpy on the host, CUDA kernels on the GPU).

    Masks stay cropped to their boxes: a dense culture has hundreds of cells, and N full-frame
    masks would cost N x H x W bytes for almost nothing but zeros. The CUDA pipeline leaves
    them on the GPU unless asked for (``masks`` is None then); each cell's area and the pixels
    covered by their union are always here, which is all a measurement needs.

    Attributes:
        boxes: ``(N, 4)`` float32 ``x0, y0, x1, y1`` in frame pixels (continuous coordinates).
        scores: ``(N,)`` float32 confidences, descending.
        class_ids: ``(N,)`` int32 class indices.
        areas_px: ``(N,)`` int64 pixel count of each mask (every one at least 1).
        covered_pixels: pixels covered by the union of the masks, each counted once.
        mask_origins: ``(N, 2)`` int32 ``(x, y)`` of each mask's top-left pixel in the frame.
        masks: N boolean arrays ``(h_i, w_i)``, pixel ``(r, c)`` of mask i being frame pixel
            ``(mask_origins[i, 1] + r, mask_origins[i, 0] + c)``; None when they stayed on the GPU.
        frame_width, frame_height: size of the frame they refer to.
    """

    boxes: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]
    class_ids: npt.NDArray[np.int32]
    areas_px: npt.NDArray[np.int64]
    covered_pixels: int
    mask_origins: npt.NDArray[np.int32]
    masks: Sequence[npt.NDArray[np.bool_]] | None
    frame_width: int
    frame_height: int

    def __post_init__(self) -> None:
        n = self.boxes.shape[0] if self.boxes.ndim == 2 else -1
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ContractError(f"Detections.boxes must be (N, 4), got {self.boxes.shape}")
        for name in ("scores", "class_ids", "areas_px"):
            if getattr(self, name).shape != (n,):
                raise ContractError(f"Detections.{name} must be ({n},), got {getattr(self, name).shape}")
        if self.mask_origins.shape != (n, 2):
            raise ContractError(f"Detections.mask_origins must be ({n}, 2), got {self.mask_origins.shape}")
        if not 0 <= self.covered_pixels <= self.frame_width * self.frame_height:
            raise ContractError(
                f"Detections.covered_pixels must be in [0, {self.frame_width * self.frame_height}], "
                f"got {self.covered_pixels}"
            )
        if self.masks is None:
            return
        if len(self.masks) != n:
            raise ContractError(f"Detections.masks must hold {n} masks, got {len(self.masks)}")
        for i, (m, (x, y)) in enumerate(zip(self.masks, self.mask_origins.tolist(), strict=True)):
            if m.ndim != 2 or m.dtype != np.bool_:
                raise ContractError(f"Detections.masks[{i}] must be a 2-D bool array, got {m.dtype} {m.shape}")
            if x < 0 or y < 0 or x + m.shape[1] > self.frame_width or y + m.shape[0] > self.frame_height:
                raise ContractError(
                    f"Detections.masks[{i}] at ({x}, {y}) size {m.shape[1]}x{m.shape[0]} leaves the "
                    f"{self.frame_width}x{self.frame_height} frame"
                )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def from_masks(
        cls,
        boxes: npt.NDArray[np.float32],
        scores: npt.NDArray[np.float32],
        class_ids: npt.NDArray[np.int32],
        mask_origins: npt.NDArray[np.int32],
        masks: Sequence[npt.NDArray[np.bool_]],
        *,
        frame_width: int,
        frame_height: int,
    ) -> Detections:
        """Detections whose areas and coverage are counted from their (host) masks."""
        areas = np.array([np.count_nonzero(m) for m in masks], dtype=np.int64)
        covered = int(union_of_masks(masks, mask_origins, frame_width, frame_height).sum()) if len(masks) else 0
        return cls(boxes, scores, class_ids, areas, covered, mask_origins, masks, frame_width, frame_height)

    @classmethod
    def empty(cls, frame_width: int, frame_height: int, *, with_masks: bool = True) -> Detections:
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.int32),
            np.zeros(0, np.int64),
            0,
            np.zeros((0, 2), np.int32),
            [] if with_masks else None,
            frame_width,
            frame_height,
        )

    def cropped_masks(self) -> Sequence[npt.NDArray[np.bool_]]:
        """The masks; ContractError when they stayed on the GPU (run the pipeline with ``want_masks``)."""
        if self.masks is None:
            raise ContractError("the masks stayed on the GPU; run the pipeline with want_masks=True for them")
        return self.masks

    def union_mask(self) -> npt.NDArray[np.bool_]:
        """``(H, W)`` union of all masks: the covered area, each pixel counted once."""
        return union_of_masks(self.cropped_masks(), self.mask_origins, self.frame_width, self.frame_height)

    def label_image(self) -> npt.NDArray[np.uint16]:
        """``(H, W)`` uint16 instance labels, 0 = background, i + 1 = detection i.

        Where masks overlap, the higher-scoring detection (lower index) keeps the pixel.
        """
        if len(self) > 65535:
            raise ContractError(f"{len(self)} detections do not fit a 16-bit label image")
        masks = self.cropped_masks()
        labels = np.zeros((self.frame_height, self.frame_width), dtype=np.uint16)
        for i in range(len(self) - 1, -1, -1):
            m = masks[i]
            x, y = (int(v) for v in self.mask_origins[i])
            region = labels[y : y + m.shape[0], x : x + m.shape[1]]
            region[m] = i + 1
        return labels


def union_of_masks(
    masks: Sequence[npt.NDArray[np.bool_]], origins: npt.NDArray[np.integer], width: int, height: int
) -> npt.NDArray[np.bool_]:
    """``(height, width)`` union of cropped masks placed at their ``(x, y)`` origins."""
    canvas = np.zeros((height, width), dtype=np.bool_)
    for m, (x, y) in zip(masks, origins.tolist(), strict=True):
        canvas[y : y + m.shape[0], x : x + m.shape[1]] |= m
    return canvas


@dataclass(frozen=True)
class Measurement:
    """What the device reports for one frame.

    Attributes:
        seq, timestamp, source: copied from the Frame.
        count: number of cells.
        confluence_pct: area of the union of cell masks over the frame area, in percent.
        areas_px: ``(count,)`` area of each cell in pixels.
        pixel_size_um: micrometres per pixel when configured, else None.
        latencies_ms: per-stage wall time (``preprocess``, ``infer``, ``postprocess``, ...).
        engine_id: identifies the model that measured it.
        acquired_at, acquired_from: when the frame was taken, and where that was read (the Frame's).
    """

    seq: int
    timestamp: float
    source: str
    count: int
    confluence_pct: float
    areas_px: npt.NDArray[np.int64]
    frame_width: int
    frame_height: int
    pixel_size_um: float | None = None
    latencies_ms: dict[str, float] = field(default_factory=dict)
    engine_id: str = ""
    acquired_at: float | None = None
    acquired_from: str = ""

    def __post_init__(self) -> None:
        if self.count != self.areas_px.shape[0]:
            raise ContractError(f"Measurement.areas_px must have count={self.count} entries, got {self.areas_px.shape}")
        if not 0.0 <= self.confluence_pct <= 100.0:
            raise ContractError(f"Measurement.confluence_pct must be in [0, 100], got {self.confluence_pct}")
        if self.pixel_size_um is not None and self.pixel_size_um <= 0:
            raise ContractError(f"Measurement.pixel_size_um must be > 0, got {self.pixel_size_um}")
