"""Overlay pictures: cell outlines and ids on the frame, count and confluence in a corner."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.pipeline.intensity import IntensityMapping, to_uint8
from cellseg.edge.pipeline.types import Detections, Frame, Measurement

_OUTLINE = (60, 230, 60)  # BGR green: visible on grey phase contrast
_TEXT = (255, 255, 255)


def draw_overlay(
    frame: Frame,
    detections: Detections,
    measurement: Measurement,
    mapping: IntensityMapping | None = None,
    draw_ids: bool = True,
) -> npt.NDArray[np.uint8]:
    """An 8-bit BGR picture of the frame with each cell's outline and id, and a summary box."""
    import cv2

    base = to_uint8(frame.pixels, mapping)
    canvas: npt.NDArray[Any] = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR) if base.ndim == 2 else base.copy()
    thickness = max(1, round(min(frame.width, frame.height) / 500))
    font_scale = max(0.35, min(frame.width, frame.height) / 1800)
    for i, (mask, (x, y)) in enumerate(zip(detections.cropped_masks(), detections.mask_origins.tolist(), strict=True)):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, _OUTLINE, thickness, offset=(int(x), int(y)))
        if draw_ids and contours:
            m = cv2.moments(max(contours, key=cv2.contourArea))
            if m["m00"] > 0:
                cx, cy = int(m["m10"] / m["m00"]) + int(x), int(m["m01"] / m["m00"]) + int(y)
                cv2.putText(
                    canvas,
                    str(i + 1),
                    (cx - 6, cy + 4),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    font_scale * 0.8,
                    (0, 220, 255),
                    1,
                    cv2.LINE_AA,
                )
    lines = [f"cells: {measurement.count}", f"confluence: {measurement.confluence_pct:.1f}%"]
    line_h = int(30 * font_scale / 0.5)
    box_w = int(230 * font_scale / 0.5)
    cv2.rectangle(canvas, (0, 0), (box_w, line_h * len(lines) + 10), (0, 0, 0), -1)
    for k, text in enumerate(lines):
        cv2.putText(
            canvas,
            text,
            (8, line_h * (k + 1)),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            _TEXT,
            1 + thickness // 2,
            cv2.LINE_AA,
        )
    return canvas
