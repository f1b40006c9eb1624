"""Detections -> Measurement: cell count, confluence and cell areas for one frame."""

from __future__ import annotations

from typing import Any

import numpy as np

from cellseg.edge.errors import ContractError
from cellseg.edge.pipeline.types import Detections, Frame, Measurement

# Size histogram bin edges in pixels, log-spaced: cells range from debris-sized specks to
# spread-out fibroblasts three orders of magnitude larger.
AREA_BIN_EDGES_PX = (0, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


def measure(
    frame: Frame,
    detections: Detections,
    latencies_ms: dict[str, float] | None = None,
    pixel_size_um: float | None = None,
    engine_id: str = "",
) -> Measurement:
    """Count, confluence (union of masks over the frame area, in %) and per-cell areas: the one
    measurement of every backend (it reads the areas and coverage the postprocess counted, so
    masks left on the GPU are not needed)."""
    if (detections.frame_width, detections.frame_height) != (frame.width, frame.height):
        raise ContractError(
            f"detections are for a {detections.frame_width}x{detections.frame_height} frame, "
            f"the frame is {frame.width}x{frame.height}"
        )
    return Measurement(
        seq=frame.seq,
        timestamp=frame.timestamp,
        source=frame.source,
        count=len(detections),
        confluence_pct=100.0 * detections.covered_pixels / (frame.width * frame.height),
        areas_px=detections.areas_px,
        frame_width=frame.width,
        frame_height=frame.height,
        pixel_size_um=pixel_size_um,
        latencies_ms=dict(latencies_ms or {}),
        engine_id=engine_id,
        acquired_at=frame.acquired_at,
        acquired_from=frame.acquired_from,
    )


def area_summary(m: Measurement) -> dict[str, Any]:
    """Mean, median and histogram of cell areas, in px and (when the pixel size is known) µm²."""
    areas = m.areas_px.astype(np.float64)
    counts, _ = np.histogram(areas, bins=np.asarray((*AREA_BIN_EDGES_PX, np.inf)))
    # Rounded past any meaning a cell area has (a pixel is ~1 µm²), so that JSON and CSV carry
    # 3052.578, not the float's 3052.5777000000003.
    mean_px = float(areas.mean()) if areas.size else 0.0
    median_px = float(np.median(areas)) if areas.size else 0.0
    out: dict[str, Any] = {
        "mean_px": round(mean_px, 2),
        "median_px": round(median_px, 2),
        "histogram_px": {"edges": list(AREA_BIN_EDGES_PX), "counts": counts.tolist()},
    }
    if m.pixel_size_um is not None:
        um2 = m.pixel_size_um**2
        out["mean_um2"] = round(mean_px * um2, 3)
        out["median_um2"] = round(median_px * um2, 3)
        # Same bins, edges in µm², so the counts stay comparable between microscopes.
        out["histogram_um2"] = {"edges": [round(e * um2, 4) for e in AREA_BIN_EDGES_PX], "counts": counts.tolist()}
    return out
