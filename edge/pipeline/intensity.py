"""Mapping of microscope frames (8, 12 or 16 bit) to the 8-bit range the model was trained on.

Training (dataset import) and the device (preprocess) both call :func:`to_uint8`, so the model
sees the same intensities in the field as in training. The mapping is a robust per-frame
percentile stretch: cameras and exposure settings differ between labs, and a fixed 16->8 shift
would leave a 12-bit camera's frames almost black.

The percentiles are taken over a regular subsample of at most ``max_samples`` pixels, so the
cost is independent of the frame size and the result is deterministic (no random sampling).
The parameters travel in the ONNX metadata (:meth:`IntensityMapping.to_dict`) so a device
applies exactly the mapping its model was trained with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.errors import ConfigError, FrameError


@dataclass(frozen=True)
class IntensityMapping:
    """Parameters of the percentile stretch from a >8-bit frame to uint8.

    Attributes:
        low_pct: percentile mapped to 0.
        high_pct: percentile mapped to 255.
        max_samples: the percentiles are computed on a strided subsample of at most this many pixels.
    """

    low_pct: float = 0.5
    high_pct: float = 99.5
    max_samples: int = 65536
    method: str = "percentile"

    def __post_init__(self) -> None:
        if self.method != "percentile":
            raise ConfigError(f"intensity mapping method must be 'percentile', got {self.method!r}")
        if not (0.0 <= self.low_pct < self.high_pct <= 100.0):
            raise ConfigError(
                f"intensity mapping needs 0 <= low_pct < high_pct <= 100, got {self.low_pct}, {self.high_pct}"
            )
        if self.max_samples < 1024:
            raise ConfigError(f"intensity mapping max_samples must be >= 1024, got {self.max_samples}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityMapping:
        unknown = set(data) - {"low_pct", "high_pct", "max_samples", "method"}
        if unknown:
            raise ConfigError(f"unknown intensity mapping keys: {sorted(unknown)}")
        return cls(**data)


def sample_stride(height: int, width: int, max_samples: int) -> int:
    """Stride in both axes so that the subsample holds at most ``max_samples`` pixels."""
    return max(1, math.ceil(math.sqrt(height * width / max_samples)))


def stretch_limits(image: npt.NDArray[Any], mapping: IntensityMapping) -> tuple[float, float]:
    """The (low, high) intensities that map to 0 and 255 for this frame.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` integer frame.
    """
    stride = sample_stride(image.shape[0], image.shape[1], mapping.max_samples)
    sample = image[::stride, ::stride]
    if sample.dtype != np.uint16:
        low, high = np.percentile(sample, [mapping.low_pct, mapping.high_pct])
        return float(low), float(high)
    # np.percentile's linear interpolation between order statistics, read off a histogram:
    # the same numbers, 4x faster than sorting the sample.
    cumulative = np.cumsum(np.bincount(sample.ravel(), minlength=65536))
    n = int(cumulative[-1])

    def order_statistic(k: int) -> int:
        return int(np.searchsorted(cumulative, k, side="right"))

    limits = []
    for pct in (mapping.low_pct, mapping.high_pct):
        position = pct / 100.0 * (n - 1)
        k = math.floor(position)
        a, b = order_statistic(k), order_statistic(min(k + 1, n - 1))
        limits.append(a + (b - a) * (position - k))
    return float(limits[0]), float(limits[1])


def stretch(image: npt.NDArray[Any], mapping: IntensityMapping) -> tuple[int, float]:
    """The frame's stretch as ``(offset, scale)``: ``uint8 = rint(max(v - offset, 0) * scale)``,
    saturated at 255; ``scale`` is 0 for a flat frame (mapped to mid-grey).

    The offset is the low percentile rounded down to a whole level: then the mapping is one
    exact integer subtraction and one multiplication, which OpenCV applies to a frame 4x
    faster than a table lookup and which a table reproduces bit for bit (a fractional offset
    would move the low limit by under 1/40 of an output level).
    """
    low, high = stretch_limits(image, mapping)
    offset = math.floor(low)
    # A flat frame (lens cap on, camera blinded) has high == low: mid-grey, not NaN.
    return offset, (255.0 / (high - offset) if high > low else 0.0)


def apply_stretch(image: npt.NDArray[np.uint16], offset: int, scale: float) -> npt.NDArray[np.uint8]:
    """``rint(max(v - offset, 0) * scale)`` saturated to uint8, for a uint16 array of any shape."""
    import cv2

    if scale == 0.0:
        return np.full(image.shape, 128, dtype=np.uint8)
    flat = image.reshape(image.shape[0], -1)  # channels folded into columns: the same per-value operation
    # Saturates at 0 (levels below the offset). OpenCV's stubs lack the scalar form it accepts.
    shifted = cv2.subtract(flat, (float(offset), 0.0, 0.0, 0.0))  # type: ignore[call-overload]
    mapped: npt.NDArray[np.uint8] = cv2.convertScaleAbs(shifted, alpha=scale).reshape(image.shape)
    return mapped


def to_uint8(image: npt.NDArray[Any], mapping: IntensityMapping | None = None) -> npt.NDArray[np.uint8]:
    """Map a frame to uint8 with the robust percentile stretch; uint8 frames pass through unchanged.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array of dtype uint8 or uint16 (12-bit data in a
            16-bit container is handled the same way).
        mapping: stretch parameters; the defaults when ``None``.

    Returns:
        Array of the same shape, dtype uint8.
    """
    if image.dtype == np.uint8:
        return image
    if image.dtype != np.uint16:
        raise FrameError(f"frames must be uint8 or uint16, got {image.dtype}")
    return apply_stretch(np.ascontiguousarray(image), *stretch(image, mapping or IntensityMapping()))


def lookup_table(image: npt.NDArray[Any], mapping: IntensityMapping | None = None) -> npt.NDArray[np.uint8]:
    """The 65536-entry uint16 -> uint8 table of this frame's stretch: ``table[frame]`` equals
    ``to_uint8(frame)`` (the CUDA preprocess kernel applies the frame's stretch through it)."""
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    return apply_stretch(levels, *stretch(image, mapping or IntensityMapping())).reshape(-1)
