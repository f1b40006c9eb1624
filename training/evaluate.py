"""``cellseg eval``: accuracy of an exported model on a dataset's val and test splits.

Predictions come from the device's own pipeline (ONNX Runtime's unless another backend and
precision are asked for), so the numbers describe what the device will do, not the training
framework. Reported per split:

- box and mask Precision, Recall, mAP@50, mAP@50-95 (COCO protocol, see metrics.py), from
  predictions at a low confidence (0.001) as is customary for mAP;
- per image, cell count and confluence of the predictions at the model's operating confidence
  against the ground truth, with their errors (count: cells and %; confluence: percentage points);
- optionally a sweep of the operating confidence: count and confluence errors at each value, from
  the same predictions, to choose the confidence a model ships with (on the train split, so the
  held-out numbers stay held out).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from cellseg.edge.bundles.engine_select import open_engine
from cellseg.edge.capture.imageio import IMAGE_SUFFIXES, read_image
from cellseg.edge.engines.registry import PipelineSettings
from cellseg.edge.errors import ConfigError, DatasetError
from cellseg.edge.pipeline.intensity import IntensityMapping
from cellseg.edge.pipeline.types import Detections, Frame, union_of_masks
from cellseg.training.metrics import IOU_THRESHOLDS, Accumulator, Instances, image_matches
from cellseg.training.yolo_dataset import SPLITS, load_data_yaml, read_label_file

EVAL_CONF = 0.001


@dataclass
class ImageResult:
    image: str
    gt_count: int
    pred_count: int
    count_error: int
    gt_confluence_pct: float
    pred_confluence_pct: float
    confluence_error_pp: float


@dataclass
class SweepRow:
    """Count and confluence errors of one split at one operating confidence."""

    conf: float
    count_mae: float
    count_mape_pct: float
    confluence_mae_pp: float


@dataclass
class SplitReport:
    split: str
    images: int
    instances: int
    box: dict[str, float]
    mask: dict[str, float]
    count_mae: float
    count_mape_pct: float
    confluence_mae_pp: float
    # Mask P, R and F1 at IoU 0.5 of the detections above the operating confidence: how many
    # of the device's reported cells are real cells, and how many real cells it reports.
    instance: dict[str, float] = field(default_factory=dict)
    per_image: list[ImageResult] = field(default_factory=list)
    sweep: list[SweepRow] = field(default_factory=list)
    # Each class's mask matches, image by image in per_image's order: what a bootstrap over the
    # images resamples (the gate's mAP interval). Kept in memory only, never written to a report.
    mask_matches: list[Accumulator] = field(default_factory=list, repr=False, compare=False)

    def best_conf(self) -> SweepRow | None:
        """The swept confidence with the smallest count error (the lower one on a tie)."""
        return min(self.sweep, key=lambda r: (r.count_mae, r.conf)) if self.sweep else None


@dataclass
class EvalReport:
    model: str
    data: str
    operating_conf: float
    splits: list[SplitReport]
    engine_precision: str = "fp32"  # as the engine reports it (int8 for a Q/DQ model, bf16, ...)
    backend: str = "onnxruntime"
    mapping: IntensityMapping = field(default_factory=IntensityMapping)  # the model's 16-to-8-bit stretch

    def to_dict(self) -> dict[str, Any]:
        splits = [replace(split, mask_matches=[]) for split in self.splits]
        out = asdict(replace(self, splits=splits))
        for split in out["splits"]:
            del split["mask_matches"]
        return out

    def format(self) -> str:
        head = (
            f"{'split':<6}{'images':>7}{'cells':>7} | {'box P':>6}{'R':>7}{'mAP50':>7}{'50-95':>7} | "
            f"{'mask P':>6}{'R':>7}{'mAP50':>7}{'50-95':>7} | {'count MAE':>9}{'MAPE%':>7}{'confl. MAE pp':>14} | "
            f"{'F1@.5':>6}"
        )
        lines = [f"model {self.model}, data {self.data}", head, "-" * len(head)]
        for s in self.splits:
            b, m = s.box, s.mask
            lines.append(
                f"{s.split:<6}{s.images:>7}{s.instances:>7} | {b['P']:>6.3f}{b['R']:>7.3f}{b['mAP50']:>7.3f}"
                f"{b['mAP50-95']:>7.3f} | {m['P']:>6.3f}{m['R']:>7.3f}{m['mAP50']:>7.3f}{m['mAP50-95']:>7.3f} | "
                f"{s.count_mae:>9.2f}{s.count_mape_pct:>7.1f}{s.confluence_mae_pp:>14.2f} | "
                f"{s.instance.get('F1', float('nan')):>6.3f}"
            )
        lines.append(
            "(F1@.5: mask instance F1 at IoU 0.5 of the cells reported at the operating confidence "
            f"{self.operating_conf})"
        )
        lines.append("")
        lines.append(f"per image (operating confidence {self.operating_conf}):")
        lines.append(f"  {'image':<28}{'gt':>5}{'pred':>6}{'err':>6}{'gt conf%':>10}{'pred conf%':>11}{'err pp':>8}")
        for s in self.splits:
            for r in s.per_image:
                lines.append(
                    f"  {s.split + '/' + r.image:<28}{r.gt_count:>5}{r.pred_count:>6}{r.count_error:>+6}"
                    f"{r.gt_confluence_pct:>10.2f}{r.pred_confluence_pct:>11.2f}{r.confluence_error_pp:>+8.2f}"
                )
        for s in self.splits:
            best = s.best_conf()
            if best is None:
                continue
            lines.append("")
            lines.append(f"operating confidence sweep, {s.split} ({s.images} images):")
            lines.append(f"  {'conf':>6}{'count MAE':>11}{'MAPE%':>8}{'confl. MAE pp':>15}")
            for row in s.sweep:
                mark = "  <- smallest count error" if row is best else ""
                lines.append(
                    f"  {row.conf:>6.3f}{row.count_mae:>11.2f}{row.count_mape_pct:>8.1f}"
                    f"{row.confluence_mae_pp:>15.2f}{mark}"
                )
        return "\n".join(lines)


def ground_truth(label_file: Path, width: int, height: int) -> Instances:
    """Rasterise a YOLO-seg label file's polygons into cropped masks at the image's resolution."""
    import cv2

    polys = read_label_file(label_file, width, height) if label_file.is_file() else []
    boxes, masks, origins = [], [], []
    for inst in polys:
        pts = np.rint(inst.polygon).astype(np.int32)
        x0, y0 = np.clip(pts.min(axis=0), 0, [width - 1, height - 1])
        x1, y1 = np.clip(pts.max(axis=0), 0, [width - 1, height - 1])
        mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
        cv2.fillPoly(mask, [pts - np.array([x0, y0], dtype=np.int32)], 1)
        masks.append(mask.astype(bool))
        origins.append((x0, y0))
        boxes.append((x0, y0, x1 + 1, y1 + 1))
    n = len(polys)
    return Instances(
        boxes=np.asarray(boxes, dtype=np.float64).reshape(n, 4),
        masks=masks,
        origins=np.asarray(origins, dtype=np.int64).reshape(n, 2),
        scores=np.ones(n),
        class_ids=np.asarray([p.class_id for p in polys], dtype=np.int64),
    )


def predictions(det: Detections) -> Instances:
    return Instances(
        boxes=det.boxes.astype(np.float64),
        masks=list(det.cropped_masks()),
        origins=det.mask_origins.astype(np.int64),
        scores=det.scores.astype(np.float64),
        class_ids=det.class_ids.astype(np.int64),
    )


def union_pct(inst: Instances, width: int, height: int, keep: npt.NDArray[np.bool_] | None = None) -> float:
    """Percentage of the image covered by the union of the (kept) instances' masks."""
    idx = np.arange(len(inst)) if keep is None else np.flatnonzero(keep)
    covered = union_of_masks([inst.masks[int(i)] for i in idx], inst.origins[idx], width, height)
    return 100.0 * float(covered.sum()) / (width * height)


def split_images(data: dict[str, Any], split: str) -> list[tuple[Path, Path]]:
    """(image, label file) pairs of one split of a YOLO dataset."""
    rel = data.get(split)
    if not rel:
        return []
    folder = Path(data["path"]) / rel
    if not folder.is_dir():
        raise DatasetError(f"split {split}: image folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    # ultralytics' convention: .../images/<split>/x.png <-> .../labels/<split>/x.txt
    if "images" not in folder.parts:
        raise DatasetError(f"split {split}: {folder} is not under an 'images' folder, so its labels cannot be found")
    parts = list(folder.parts)
    parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
    label_dir = Path(*parts)
    return [(img, label_dir / f"{img.stem}.txt") for img in images]


def evaluate(
    model: Path,
    data_yaml: Path,
    splits: tuple[str, ...] = ("val", "test"),
    *,
    operating_conf: float | None = None,
    iou: float | None = None,
    max_det: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    keep_predictions: bool = False,
    sweep: Sequence[float] = (),
    backend: str = "onnxruntime",
    precision: str = "fp32",
    exclude: Collection[str] = (),
    pool: bool = False,
) -> tuple[EvalReport, dict[str, list[tuple[str, Instances, Instances]]]]:
    """Evaluate an ONNX model; returns the report and, with ``keep_predictions``, the raw
    (image, ground truth, predictions) triples per split (for cross-checks).

    ``sweep``: operating confidences (each >= EVAL_CONF and < 1) at which to also report the
    count and confluence errors of every split. ``backend`` and ``precision``: which engine runs
    the model and at which float precision (``engine.backend``, ``engine.precision``), so that
    every precision a device may run is judged on the same frames. ``exclude``: image file names
    left out (an INT8 model's calibration frames, when it is gated on the train split).
    ``pool``: report the splits as one, named ``val+train`` and so on (the accuracy gate's frames).
    """
    bad = [c for c in sweep if not EVAL_CONF <= c < 1.0]
    if bad:
        raise ConfigError(f"sweep confidences must lie in [{EVAL_CONF}, 1): got {bad}")
    data = load_data_yaml(data_yaml)
    kept: dict[str, list[tuple[str, Instances, Instances]]] = {}
    reports = []
    opened = open_engine(Path(model), backend, threads, compute=precision)
    engine = opened.engine
    try:
        t = engine.info.thresholds
        op_conf = t.conf if operating_conf is None else operating_conf
        predictor = opened.backend.pipeline(
            engine, PipelineSettings(t.overridden(conf=EVAL_CONF, iou=iou, max_det=max_det))
        )
        n_classes = engine.info.num_classes
        unknown = [split for split in splits if split not in SPLITS]
        if unknown:
            raise DatasetError(f"unknown split {unknown[0]!r}; expected one of {SPLITS}")
        groups = [(split, split_images(data, split)) for split in splits]
        if pool:
            groups = [("+".join(splits), [pair for _, pairs in groups for pair in pairs])]
        for split, all_pairs in groups:
            pairs = [(image, label) for image, label in all_pairs if image.name not in exclude]
            if not pairs:
                continue
            acc = {kind: [Accumulator() for _ in range(n_classes)] for kind in ("box", "mask")}
            triples = []
            # Per image results at the operating confidence and at each swept one.
            at_conf: dict[float, list[ImageResult]] = {conf: [] for conf in sorted({*sweep, op_conf})}
            for image_path, label_path in tqdm(pairs, desc=f"eval {split}", unit="image", disable=not progress):
                pixels = read_image(image_path)
                h, w = pixels.shape[:2]
                gt = ground_truth(label_path, w, h)
                det = predictor(Frame(pixels, source=str(image_path)), want_masks=True).detections
                pred = predictions(det)
                for kind in ("box", "mask"):
                    for c in range(n_classes):
                        acc[kind][c].add(*image_matches(gt, pred, c, kind))
                gconf = union_pct(gt, w, h)
                # The detections were kept down to EVAL_CONF, and greedy NMS only lets a higher score
                # suppress a lower one, so those above any higher confidence are exactly what the
                # device keeps at that confidence: one inference serves every confidence.
                for conf, results in at_conf.items():
                    results.append(_image_result(image_path.stem, len(gt), gconf, pred, (w, h), conf=conf))
                if keep_predictions:
                    triples.append((str(image_path), gt, pred))
            kept[split] = triples
            report = _split_report(split, acc, at_conf[op_conf], op_conf)
            report.sweep = [SweepRow(conf, *_count_errors(at_conf[conf])) for conf in sorted(set(sweep))]
            reports.append(report)
    finally:
        engine.close()
    evaluated = EvalReport(
        str(model), str(data_yaml), op_conf, reports, engine.precision, opened.backend.name, engine.info.mapping
    )
    return evaluated, kept


def _image_result(
    name: str, gt_count: int, gt_confluence: float, pred: Instances, size: tuple[int, int], *, conf: float
) -> ImageResult:
    """One image's count and confluence at operating confidence ``conf``."""
    operating = pred.scores > conf
    count = int(operating.sum())
    confluence = union_pct(pred, *size, operating)
    return ImageResult(
        name, gt_count, count, count - gt_count, round(gt_confluence, 4), round(confluence, 4),
        round(confluence - gt_confluence, 4),
    )  # fmt: skip


def _count_errors(per_image: list[ImageResult]) -> tuple[float, float, float]:
    """Count MAE (cells), count MAPE (%) and confluence MAE (pp) over images."""
    gt = np.array([r.gt_count for r in per_image], dtype=np.float64)
    abs_err = np.abs(np.array([r.pred_count for r in per_image], dtype=np.float64) - gt)
    confluence = np.array([abs(r.confluence_error_pp) for r in per_image])
    return float(abs_err.mean()), float(100 * (abs_err / np.maximum(gt, 1)).mean()), float(confluence.mean())


def _split_report(
    split: str, acc: dict[str, list[Accumulator]], per_image: list[ImageResult], op_conf: float
) -> SplitReport:
    def summary(accs: list[Accumulator]) -> dict[str, float]:
        aps = np.array([a.average_precision() for a in accs if a.n_gt > 0])
        prs = np.array([a.precision_recall_at_best_f1()[:2] for a in accs if a.n_gt > 0])
        if aps.size == 0:
            return {"P": 0.0, "R": 0.0, "mAP50": 0.0, "mAP50-95": 0.0}
        i50 = int(np.argmin(np.abs(IOU_THRESHOLDS - 0.5)))
        return {
            "P": float(prs[:, 0].mean()),
            "R": float(prs[:, 1].mean()),
            "mAP50": float(aps[:, i50].mean()),
            "mAP50-95": float(aps.mean()),
        }

    mae, mape, confluence_mae = _count_errors(per_image)
    # Averaged over the classes that have ground truth, like mAP.
    prf = np.array([a.f1_at(op_conf) for a in acc["mask"] if a.n_gt > 0]).reshape(-1, 3)
    instance = dict(zip(("P", "R", "F1"), (float(v) for v in prf.mean(axis=0)), strict=True)) if len(prf) else {}
    return SplitReport(
        split=split,
        images=len(per_image),
        instances=sum(r.gt_count for r in per_image),
        box=summary(acc["box"]),
        mask=summary(acc["mask"]),
        count_mae=mae,
        count_mape_pct=mape,
        confluence_mae_pp=confluence_mae,
        instance=instance,
        per_image=per_image,
        mask_matches=acc["mask"],
    )


def write_json(report: EvalReport, path: Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2))
