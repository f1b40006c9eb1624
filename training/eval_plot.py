"""``cellseg eval --plot``: where a model's counts go wrong.

One picture: predicted against true count and confluence per image (a point per frame, the identity
line, each split its own marker), and below them the frames with the largest count errors, each
cell marked by what happened to it at the operating confidence:

- green: a reported cell that matches a true cell (mask IoU at least 0.5);
- red: a reported cell that matches none (a false positive);
- yellow: a true cell that no reported cell matches (a miss).

Matching is one-to-one, by the Hungarian assignment on mask IoU: the same rule as the instance F1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.errors import DependencyError
from cellseg.edge.pipeline.intensity import IntensityMapping, to_uint8
from cellseg.training.evaluate import EvalReport
from cellseg.training.metrics import Instances, mask_iou

MATCH_IOU = 0.5
_GREEN, _RED, _YELLOW = (60, 200, 60), (40, 40, 230), (0, 220, 255)  # BGR


@dataclass(frozen=True)
class FrameOutcome:
    """One frame at the operating confidence: which reported cells are real, which real cells were missed."""

    image: str
    reported: Instances
    matched: npt.NDArray[np.bool_]  # per reported cell
    truth: Instances
    found: npt.NDArray[np.bool_]  # per true cell

    @property
    def count_error(self) -> int:
        return len(self.reported) - len(self.truth)


def outcome(image: str, truth: Instances, predictions: Instances, conf: float) -> FrameOutcome:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:
        raise DependencyError("scipy", "edge", "matching cells one to one for the evaluation picture") from e

    reported = predictions.select(np.flatnonzero(predictions.scores > conf))
    iou = mask_iou(reported, truth)
    matched = np.zeros(len(reported), dtype=bool)
    found = np.zeros(len(truth), dtype=bool)
    if iou.size:
        rows, cols = linear_sum_assignment(-iou)
        good = iou[rows, cols] >= MATCH_IOU
        matched[rows[good]] = True
        found[cols[good]] = True
    return FrameOutcome(image, reported, matched, truth, found)


@dataclass(frozen=True)
class MissRow:
    """Recall of one kind of true cell over all frames."""

    kind: str
    cells: int
    missed: int

    @property
    def recall(self) -> float:
        return 1.0 - self.missed / self.cells if self.cells else float("nan")


EDGE_PX = 10  # a cell within this many pixels of the frame border is an edge cell
TOUCH_PX = 2  # true cells closer than this are touching (a cluster)


def miss_breakdown(outcomes: list[FrameOutcome]) -> list[MissRow]:
    """Where the misses are: recall of true cells that touch another (clusters) against isolated
    ones, of the smallest, middle and largest third by area, and at the frame edge or inside."""
    import cv2

    kinds: dict[str, list[bool]] = {}
    areas, missed_by_area = [], []
    kernel = np.ones((2 * TOUCH_PX + 1, 2 * TOUCH_PX + 1), np.uint8)
    for o in outcomes:
        height, width = read_image(o.image).shape[:2]
        owner = np.zeros((height, width), np.int32)
        for i, (m, (x, y)) in enumerate(zip(o.truth.masks, o.truth.origins.tolist(), strict=True)):
            owner[y : y + m.shape[0], x : x + m.shape[1]][m] = i + 1
        for i, (m, (x, y)) in enumerate(zip(o.truth.masks, o.truth.origins.tolist(), strict=True)):
            missed = not o.found[i]
            x0, y0 = max(x - TOUCH_PX, 0), max(y - TOUCH_PX, 0)
            x1, y1 = min(x + m.shape[1] + TOUCH_PX, width), min(y + m.shape[0] + TOUCH_PX, height)
            grown = np.zeros((y1 - y0, x1 - x0), np.uint8)
            grown[y - y0 : y - y0 + m.shape[0], x - x0 : x - x0 + m.shape[1]] = m
            ring = cv2.dilate(grown, kernel).astype(bool)
            neighbours = owner[y0:y1, x0:x1][ring]
            touching = bool(np.any((neighbours > 0) & (neighbours != i + 1)))
            kinds.setdefault("touching another cell" if touching else "isolated", []).append(missed)
            edge = x < EDGE_PX or y < EDGE_PX or x + m.shape[1] > width - EDGE_PX or y + m.shape[0] > height - EDGE_PX
            kinds.setdefault("at the frame edge" if edge else "inside the frame", []).append(missed)
            areas.append(int(np.count_nonzero(m)))
            missed_by_area.append(missed)
    rows = [MissRow(k, len(v), int(sum(v))) for k, v in kinds.items()]
    if areas:
        cut = np.percentile(areas, [100 / 3, 200 / 3])
        for name, keep in (
            (f"smallest third (< {cut[0]:.0f} px)", np.asarray(areas) < cut[0]),
            ("middle third", (np.asarray(areas) >= cut[0]) & (np.asarray(areas) < cut[1])),
            (f"largest third (>= {cut[1]:.0f} px)", np.asarray(areas) >= cut[1]),
        ):
            flags = np.asarray(missed_by_area)[keep]
            rows.append(MissRow(name, int(flags.size), int(flags.sum())))
    order = ["isolated", "touching another cell", "inside the frame", "at the frame edge"]
    return sorted(rows, key=lambda r: (order.index(r.kind) if r.kind in order else len(order), r.kind))


def format_misses(rows: list[MissRow]) -> str:
    lines = [f"  {'true cells':<34}{'cells':>7}{'missed':>8}{'recall':>8}"]
    lines += [f"  {r.kind:<34}{r.cells:>7}{r.missed:>8}{r.recall:>8.3f}" for r in rows]
    return "\n".join(lines)


def draw_outcome(o: FrameOutcome, mapping: IntensityMapping | None = None) -> npt.NDArray[np.uint8]:
    """The frame (8-bit BGR) with every reported and every missed cell outlined in its colour."""
    import cv2

    base = to_uint8(read_image(o.image), mapping)
    canvas: npt.NDArray[Any] = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR) if base.ndim == 2 else base.copy()
    thickness = max(1, round(min(canvas.shape[:2]) / 400))

    def outline(inst: Instances, i: int, colour: tuple[int, int, int]) -> None:
        contours, _ = cv2.findContours(inst.masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        x, y = (int(v) for v in inst.origins[i])
        cv2.drawContours(canvas, contours, -1, colour, thickness, offset=(x, y))

    for i in range(len(o.reported)):
        outline(o.reported, i, _GREEN if o.matched[i] else _RED)
    for i in np.flatnonzero(~o.found).tolist():
        outline(o.truth, i, _YELLOW)
    return canvas


def frame_outcomes(report: EvalReport, kept: dict[str, list[tuple[str, Instances, Instances]]]) -> list[FrameOutcome]:
    """Every evaluated frame's outcome at the report's operating confidence."""
    conf = report.operating_conf
    return [outcome(image, gt, pred, conf) for triples in kept.values() for image, gt, pred in triples]


def plot_eval(
    report: EvalReport,
    outcomes: list[FrameOutcome],
    path: Path,
    *,
    worst: int = 3,
    mapping: IntensityMapping | None = None,
) -> list[FrameOutcome]:
    """Write the picture of ``report`` and its frames' ``outcomes`` (:func:`frame_outcomes`) to
    ``path`` (PNG, SVG or PDF by its suffix); returns the worst frames shown."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise DependencyError("matplotlib", "plot", "drawing evaluation pictures") from e

    conf = report.operating_conf
    shown = sorted(outcomes, key=lambda o: (-abs(o.count_error), o.image))[:worst]
    columns = max(2, len(shown))
    fig = plt.figure(figsize=(4.2 * columns, 8.6 if shown else 4.2), constrained_layout=True)
    grid = fig.add_gridspec(2 if shown else 1, columns)
    ax_count, ax_conf = fig.add_subplot(grid[0, : columns // 2]), fig.add_subplot(grid[0, columns // 2 :])
    for split, marker in zip(report.splits, "os^", strict=False):
        rows = split.per_image
        f1 = split.instance.get("F1", 0.0)
        ax_count.scatter([r.gt_count for r in rows], [r.pred_count for r in rows], marker=marker, alpha=0.8,
                         label=f"{split.split}: MAPE {split.count_mape_pct:.1f} %, F1 {f1:.2f}")  # fmt: skip
        ax_conf.scatter([r.gt_confluence_pct for r in rows], [r.pred_confluence_pct for r in rows], marker=marker,
                        alpha=0.8, label=f"{split.split}: MAE {split.confluence_mae_pp:.2f} pp")  # fmt: skip
    for ax, what in ((ax_count, "cell count"), (ax_conf, "confluence (%)")):
        low, high = (min(*ax.get_xlim(), *ax.get_ylim()), max(*ax.get_xlim(), *ax.get_ylim()))
        ax.plot([low, high], [low, high], color="grey", linewidth=1, linestyle="--", label="identity")
        ax.set_xlabel(f"true {what}")
        ax.set_ylabel(f"predicted {what}")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    ax_count.set_title(f"count per image (confidence {conf:g})")
    ax_conf.set_title("confluence per image")
    for k, o in enumerate(shown):
        ax = fig.add_subplot(grid[1, k])
        ax.imshow(draw_outcome(o, mapping)[:, :, ::-1])
        ax.set_title(
            f"{Path(o.image).stem}: {len(o.reported)} reported, {len(o.truth)} true\n"
            f"{int((~o.matched).sum())} false (red), {int((~o.found).sum())} missed (yellow)",
            fontsize=9,
        )
        ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return shown
