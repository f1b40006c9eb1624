"""``cellseg cv``: K-fold cross-validation of one training recipe over every annotated frame.

Five validation frames cannot tell two models apart (a cell or two moves the count error by a
point), so model decisions are taken here instead. The frames of every split of a dataset are
pooled, grouped by field (:mod:`cellseg.training.fields`) and dealt into K folds of about equal
size, a field never on both sides. For each fold, in ``<run>/fold<k>/``:

1. train the recipe on the other folds, with no validation during training: the held-out fold
   must not choose the epoch, so the model is the last epoch's;
2. export it to ONNX (checked against PyTorch as every export is);
3. choose its operating confidence by the smallest count error on its own training frames, as
   the shipped model's was chosen;
4. evaluate the held-out fold at that confidence with the device's pipeline (``cellseg eval``).

Each fold's result is written as it finishes (``fold<k>/result.json``); a run started again skips
finished folds and resumes an interrupted training from its last epoch, so a CV can span sessions.
The report gives every fold and the mean and sample standard deviation over folds. Its JSON
(``cellseg cv --json``) carries the plan with frames by name, so it can start the run again on
another machine (:func:`seed_run`, ``cellseg cv --from``) when the one that ran the first folds is gone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cellseg.edge.errors import ConfigError, DatasetError
from cellseg.training.evaluate import SplitReport, evaluate, split_images
from cellseg.training.fields import field_groups
from cellseg.training.recipe import Recipe, load_recipe, recipe_from_dict
from cellseg.training.yolo_dataset import SPLITS, load_data_yaml

logger = logging.getLogger(__name__)

# A new run's number of folds and seed of the assignment, unless given.
DEFAULT_FOLDS, DEFAULT_SEED = 5, 0
# What a plan holds besides its frames, and what it holds of each frame in a saved report.
_PLAN_SETTINGS = ("folds", "seed", "field_pattern", "groups")
_PLAN_FRAME = ("image", "split", "cells", "field", "fold")
# The confidences tried on each fold's training frames (0.20, 0.21, ..., 0.70).
CONF_SWEEP = tuple(round(0.2 + 0.01 * i, 2) for i in range(51))
# What the report averages over folds, with the SplitReport field each comes from.
METRICS = {
    "count_mape_pct": "count MAPE %",
    "count_mae": "count MAE",
    "confluence_mae_pp": "confl. MAE pp",
    "mask_map50": "mask mAP50",
    "mask_map50_95": "mask mAP50-95",
    "instance_f1": "F1@.5",
}


@dataclass(frozen=True)
class PoolImage:
    """One annotated frame of the pooled dataset."""

    image: Path
    label: Path
    split: str  # the split it came from in the source dataset
    cells: int


@dataclass
class FoldResult:
    fold: int
    images: list[str]
    cells: int
    conf: float
    metrics: dict[str, float]
    train_seconds: float
    epochs: int
    per_image: list[dict[str, Any]] = field(default_factory=list)
    # The dtypes the fold's network trained in (cpu_bf16 falls back to float32 on a CPU without
    # native bfloat16, so one CV may hold both); empty in reports from before it was recorded.
    network_dtype: list[str] = field(default_factory=list)


@dataclass
class CvReport:
    name: str
    recipe: dict[str, Any]
    data: str
    folds_total: int
    groups: int
    folds: list[FoldResult]
    # The fold of every frame, frames by file name (unique in a pooled dataset), so that the
    # report holds no machine's paths and can seed a run elsewhere (seed_run).
    plan: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, saved: dict[str, Any], name: str) -> CvReport:
        """A report read back from its JSON (``to_dict``), named ``name``."""
        return cls(
            name=name,
            recipe=saved["recipe"],
            data=saved["data"],
            folds_total=saved["folds_total"],
            groups=saved["groups"],
            folds=[FoldResult(**f) for f in saved["folds"]],
            plan=saved.get("plan", {}),
        )

    def summary(self, folds: Collection[int] | None = None) -> dict[str, tuple[float, float]]:
        """Mean and sample standard deviation over the finished folds (or those of ``folds``), per metric."""
        out = {}
        chosen = [f for f in self.folds if folds is None or f.fold in folds]
        for key in METRICS:
            values = [f.metrics[key] for f in chosen if not math.isnan(f.metrics[key])]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else float("nan")
                out[key] = (statistics.fmean(values), spread)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": {k: {"mean": m, "std": s} for k, (m, s) in self.summary().items()}}

    def format(self) -> str:
        lines = [
            f"{self.name}: {len(self.folds)} of {self.folds_total} folds, {self.groups} fields, data {self.data}",
            f"{'fold':>5}{'images':>7}{'cells':>7}{'conf':>6}{'epochs':>7}{'train s':>9} | "
            + "".join(f"{label:>15}" for label in METRICS.values()),
        ]
        lines.append("-" * len(lines[-1]))
        for f in self.folds:
            lines.append(
                f"{f.fold:>5}{len(f.images):>7}{f.cells:>7}{f.conf:>6.2f}{f.epochs:>7}{f.train_seconds:>9.0f} | "
                + "".join(f"{f.metrics[k]:>15.3f}" for k in METRICS)
            )
        summary = self.summary()
        lines.append(
            f"{'mean ± sd':>41} | " + "".join(f"{_pm(*summary[k]) if k in summary else '-':>15}" for k in METRICS)
        )
        return "\n".join(lines)


def _pm(mean: float, spread: float) -> str:
    return f"{mean:.3f}±{spread:.3f}" if not math.isnan(spread) else f"{mean:.3f}"


def pool_dataset(data_yaml: Path) -> list[PoolImage]:
    """Every annotated frame of every split of a YOLO dataset."""
    from cellseg.training.yolo_dataset import read_label_file

    data = load_data_yaml(data_yaml)
    pooled = []
    for split in SPLITS:
        for image, label in split_images(data, split):
            # Only the count is needed here; the size does not change it.
            cells = len(read_label_file(label, 1, 1)) if label.is_file() else 0
            pooled.append(PoolImage(image, label, split, cells))
    names = [p.image.name for p in pooled]
    if len(set(names)) != len(names):
        raise DatasetError(f"{data_yaml}: image names repeat across splits, so folds could not keep them apart")
    return pooled


def assign_folds(groups: Sequence[int], cells: Sequence[int], k: int, *, seed: int = 0) -> list[int]:
    """A fold (0..k-1) per image: whole groups, dealt so that folds have about equal numbers of
    frames (and of cells, as the tie-break). Groups are taken largest first, in a seeded order
    among equals, each into the fold with the fewest frames so far."""
    n_groups = len(set(groups))
    if k < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {k}")
    if n_groups < k:
        raise ConfigError(f"{n_groups} fields cannot make {k} folds (a field is never split); use --folds {n_groups}")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = sorted(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: the shuffle decides among equal sizes
    size, load = [0] * k, [0] * k
    fold_of = [0] * len(groups)
    for g in order:
        target = min(range(k), key=lambda f: (size[f], load[f], f))
        for i in members[g]:
            fold_of[i] = target
        size[target] += len(members[g])
        load[target] += sum(cells[i] for i in members[g])
    return fold_of


def write_fold_dataset(
    pooled: Sequence[PoolImage], fold_of: Sequence[int], fold: int, out: Path, names: list[str]
) -> Path:
    """A dataset whose val split is the fold and whose train split is the rest, as symbolic links
    (the frames are not copied); returns its data.yaml."""
    for split in ("train", "val"):
        for sub in ("images", "labels"):
            (out / sub / split).mkdir(parents=True, exist_ok=True)
    for p, f in zip(pooled, fold_of, strict=True):
        split = "val" if f == fold else "train"
        for src, sub in ((p.image, "images"), (p.label, "labels")):
            link = out / sub / split / src.name
            if link.is_symlink() or link.exists():
                link.unlink()
            if src.is_file():
                link.symlink_to(src.resolve())
    data_yaml = out / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": names}))
    return data_yaml


def cross_validate(
    data_yaml: Path,
    recipe: Recipe,
    folds: int | None,
    run_dir: Path,
    *,
    seed: int | None = None,
    field_pattern: str | None = None,
    only: Sequence[int] = (),
    threads: int | None = None,
    progress: bool = True,
) -> CvReport:
    """Run (or continue) a K-fold CV; folds are numbered 1..K. ``only`` limits this call to some folds.
    ``folds`` and ``seed`` left ``None`` are the run's own when it continues, else the defaults."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(data_yaml, folds, run_dir, seed=seed, field_pattern=field_pattern, progress=progress)
    folds = int(plan["folds"])
    pooled = [PoolImage(Path(p["image"]), Path(p["label"]), p["split"], p["cells"]) for p in plan["images"]]
    fold_of = [p["fold"] for p in plan["images"]]
    saved_recipe = run_dir / "recipe.yaml"
    if saved_recipe.is_file():
        kept = load_recipe(saved_recipe)
        if kept != recipe:
            raise ConfigError(
                f"{run_dir} is a CV of another recipe ({saved_recipe}); "
                "continue it with that recipe or choose another --run"
            )
    else:
        saved_recipe.write_text(yaml.safe_dump(recipe.model_dump(), sort_keys=False))
    bad = [f for f in only if not 1 <= f <= folds]
    if bad:
        raise ConfigError(f"--fold {bad}: folds are numbered 1..{folds}")
    names = load_data_yaml(data_yaml)["names"]
    say = _announcer(progress)
    todo = [f for f in range(1, folds + 1) if (not only or f in only)]
    spent: list[float] = []
    for k, fold in enumerate(todo):
        result_file = _result_file(run_dir, fold)
        if result_file.is_file():
            say(f"cv fold {fold}/{folds}: finished earlier, kept ({result_file})")
            continue
        held = sum(1 for f in fold_of if f == fold)
        eta = f"; about {statistics.fmean(spent) * (len(todo) - k) / 60:.0f} min left" if spent else ""
        say(f"cv fold {fold}/{folds}: training on {len(fold_of) - held} frames, {held} held out{eta}")
        started = time.monotonic()
        result = _run_fold(
            pooled, fold_of, fold, _fold_dir(run_dir, fold), recipe, names=names, threads=threads, progress=progress
        )
        _write_result(run_dir, result)
        spent.append(time.monotonic() - started)
        m = result.metrics
        say(f"cv fold {fold}/{folds} done in {spent[-1] / 60:.0f} min: count MAPE {m['count_mape_pct']:.1f} %, "
            f"confluence MAE {m['confluence_mae_pp']:.2f} pp, mask mAP50 {m['mask_map50']:.3f}, "
            f"F1@.5 {m['instance_f1']:.3f} at confidence {result.conf:.2f}")  # fmt: skip
    return load_report(run_dir)


def _fold_dir(run_dir: Path, fold: int) -> Path:
    return run_dir / f"fold{fold}"


def _result_file(run_dir: Path, fold: int) -> Path:
    return _fold_dir(run_dir, fold) / "result.json"


def _write_result(run_dir: Path, result: FoldResult) -> None:
    path = _result_file(run_dir, result.fold)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=2))


def _announcer(progress: bool) -> Callable[[str], None]:
    """Progress lines on standard error for a person watching (a CV runs for hours), else the log."""
    if not progress:
        return logger.info

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return say


def _plan(
    data_yaml: Path, folds: int | None, run_dir: Path, *, seed: int | None, field_pattern: str | None, progress: bool
) -> dict[str, Any]:
    """The fold of every frame, computed once and kept in ``folds.json`` so that a continued run
    (or one on another machine) trains on exactly the same folds."""
    plan_file = run_dir / "folds.json"
    if plan_file.is_file():
        plan: dict[str, Any] = json.loads(plan_file.read_text())
        if (folds is not None and plan["folds"] != folds) or (seed is not None and plan["seed"] != seed):
            raise ConfigError(
                f"{run_dir} holds a {plan['folds']}-fold CV with seed {plan['seed']}; "
                "continue it with those or choose another --run"
            )
        missing = [p["image"] for p in plan["images"] if not Path(p["image"]).is_file()]
        if missing:
            raise DatasetError(
                f"{run_dir} was planned on frames that are gone ({len(missing)}, e.g. {missing[0]}); "
                "put the dataset back where it was, or start a new --run"
            )
        return plan
    pooled = pool_dataset(data_yaml)
    if not pooled:
        raise DatasetError(f"{data_yaml}: no annotated images in any split")
    groups = field_groups([p.image for p in pooled], pattern=field_pattern, progress=progress)
    folds = DEFAULT_FOLDS if folds is None else folds
    seed = DEFAULT_SEED if seed is None else seed
    fold_of = assign_folds(groups, [p.cells for p in pooled], folds, seed=seed)
    plan = {
        "data": str(Path(data_yaml).absolute()),
        "folds": folds,
        "seed": seed,
        "field_pattern": field_pattern,
        "groups": len(set(groups)),
        "images": [
            {
                "image": str(p.image),
                "label": str(p.label),
                "split": p.split,
                "cells": p.cells,
                "field": g,
                "fold": f + 1,
            }
            for p, g, f in zip(pooled, groups, fold_of, strict=True)
        ],
    }
    plan_file.write_text(json.dumps(plan, indent=2))
    return plan


def _run_fold(
    pooled: Sequence[PoolImage],
    fold_of: Sequence[int],
    fold: int,
    fold_dir: Path,
    recipe: Recipe,
    *,
    names: list[str],
    threads: int | None,
    progress: bool,
) -> FoldResult:
    from cellseg.training.export import export_onnx
    from cellseg.training.train import train

    data = write_fold_dataset(pooled, fold_of, fold, fold_dir / "data", names)
    train_dir = fold_dir / "train"
    manifest_file = train_dir / "manifest.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
    else:
        # An interrupted fold resumes from its last epoch (cross_validate announces the fold).
        resume = (train_dir / "weights" / "last.pt").is_file()
        manifest = train(recipe.model_copy(update={"val": False}), data, train_dir, resume=resume).manifest
    model = fold_dir / "model.onnx"
    held_out = [p.image for p, f in zip(pooled, fold_of, strict=True) if f == fold]
    if not model.is_file():
        export_onnx(train_dir / "weights" / "last.pt", model, held_out[:1], run_dir=train_dir)
    # The confidence is chosen on the fold's training frames, so the held-out numbers stay held out.
    threads = threads or os.cpu_count()
    on_train, _ = evaluate(model, data, ("train",), threads=threads, progress=progress, sweep=CONF_SWEEP)
    best = on_train.splits[0].best_conf()
    conf = best.conf if best is not None else on_train.operating_conf
    report, _ = evaluate(model, data, ("val",), operating_conf=conf, threads=threads, progress=progress)
    held = report.splits[0]
    return FoldResult(
        fold=fold,
        images=[p.name for p in held_out],
        cells=held.instances,
        conf=conf,
        metrics=fold_metrics(held),
        train_seconds=float(manifest.get("train_seconds", 0.0)),
        epochs=int(manifest.get("epochs_completed", 0)),
        per_image=[asdict(r) for r in held.per_image],
        network_dtype=list(manifest.get("network_dtype", [])),
    )


def fold_metrics(split: SplitReport) -> dict[str, float]:
    return {
        "count_mape_pct": split.count_mape_pct,
        "count_mae": split.count_mae,
        "confluence_mae_pp": split.confluence_mae_pp,
        "mask_map50": split.mask["mAP50"],
        "mask_map50_95": split.mask["mAP50-95"],
        "instance_f1": split.instance.get("F1", float("nan")),
    }


def load_report(source: Path) -> CvReport:
    """The report of a CV run folder (from its plan and finished folds), or one saved as JSON."""
    source = Path(source)
    if source.is_file():
        return _read_report(source)
    plan_file = source / "folds.json"
    if not plan_file.is_file():
        raise ConfigError(f"{source} is neither a cross-validation run (no folds.json) nor a saved report")
    plan = json.loads(plan_file.read_text())
    recipe = yaml.safe_load((source / "recipe.yaml").read_text()) if (source / "recipe.yaml").is_file() else {}
    results = []
    for fold in range(1, plan["folds"] + 1):
        path = _result_file(source, fold)
        if path.is_file():
            results.append(FoldResult(**json.loads(path.read_text())))
    portable = {key: plan.get(key) for key in _PLAN_SETTINGS}
    portable["images"] = [
        {key: p[key] for key in _PLAN_FRAME} | {"image": Path(p["image"]).name} for p in plan["images"]
    ]
    return CvReport(source.name, recipe, _shown(plan["data"]), plan["folds"], plan["groups"], results, portable)


def _shown(path: str) -> str:
    """A dataset path as a report shows it: relative to the working folder when under it, so that a
    report published from a project checkout names no machine's folders."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _read_report(path: Path) -> CvReport:
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise TypeError("not a JSON object")
        return CvReport.from_dict(saved, path.stem)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a cellseg cv report ({type(exc).__name__}: {exc})") from exc


def seed_run(report_file: Path, data_yaml: Path, run_dir: Path) -> CvReport:
    """Start the run folder ``run_dir`` from a saved report: its plan, recipe and finished folds, with
    the frames found by name in this machine's copy of the dataset; ``cross_validate`` then runs the
    folds still to do. A slow candidate's CV spans sessions, and the machine that ran its first
    folds may not come back; the report, kept with the project, is enough to go on. The plan is
    taken as saved rather than computed again, so a change in how fields are found cannot move a
    frame into another fold halfway through a CV."""
    report = _read_report(report_file)
    plan = report.plan
    if not isinstance(plan, dict) or not plan.get("images"):
        raise ConfigError(f"{report_file}: the report has no plan, so it cannot seed a run")
    try:
        settings = {key: plan[key] for key in _PLAN_SETTINGS}
        planned = {p["image"]: {key: p[key] for key in _PLAN_FRAME} for p in plan["images"]}
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{report_file}: its plan is malformed ({type(exc).__name__}: {exc})") from exc
    run_dir = Path(run_dir)
    if (run_dir / "folds.json").exists():
        raise ConfigError(f"{run_dir} is a CV run already; continue it without --from, or choose another --run")
    pooled = {p.image.name: p for p in pool_dataset(data_yaml)}
    missing = sorted(set(planned) - set(pooled))
    unplanned = sorted(set(pooled) - set(planned))
    recounted = sorted(n for n, p in planned.items() if n in pooled and pooled[n].cells != p["cells"])
    problems = [
        f"{len(missing)} planned frames are not in it (e.g. {missing[0]})" if missing else "",
        f"{len(unplanned)} of its frames are not in the plan (e.g. {unplanned[0]})" if unplanned else "",
        f"{len(recounted)} frames have other cell counts (e.g. {recounted[0]})" if recounted else "",
    ]
    if any(problems):
        raise DatasetError(
            f"{data_yaml} is not the dataset {report_file} was planned on: " + "; ".join(filter(None, problems))
        )
    for result in report.folds:
        held = sorted(n for n, p in planned.items() if p["fold"] == result.fold)
        if sorted(result.images) != held:
            raise ConfigError(f"{report_file}: fold {result.fold}'s frames are not the plan's")
    recipe_from_dict(report.recipe, f"{report_file}: recipe")  # one this cellseg can train, checked now
    run_dir.mkdir(parents=True, exist_ok=True)
    local = {
        **settings,
        "data": str(Path(data_yaml).absolute()),
        "images": [{**p, "image": str(pooled[n].image), "label": str(pooled[n].label)} for n, p in planned.items()],
    }
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(report.recipe, sort_keys=False))
    for result in report.folds:
        _write_result(run_dir, result)
    # The plan last: a run folder with folds.json is a run, so a failure above leaves none.
    (run_dir / "folds.json").write_text(json.dumps(local, indent=2))
    return load_report(run_dir)


def format_candidates(reports: Sequence[CvReport]) -> str:
    """One row per candidate: mean ± sd over its folds of each metric.

    A CV of a slow candidate finishes a fold per session, so candidates are often compared before
    all of them have every fold. Folds differ in difficulty more than candidates may, so when the
    finished folds differ, the candidates are also compared on the folds every one of them
    finished, provided those folds hold the same frames (the same plan).
    """
    head = f"{'candidate':<28}{'folds':>6}{'imgsz':>6} | " + "".join(f"{label:>15}" for label in METRICS.values())
    lines = [head, "-" * len(head)]

    def rows(folds: Collection[int] | None) -> None:
        for r in reports:
            summary = r.summary(folds)
            done = len(r.folds) if folds is None else len(folds)
            lines.append(
                f"{r.name:<28}{done:>3}/{r.folds_total:<2}{r.recipe.get('imgsz', '?'):>6} | "
                + "".join(f"{_pm(*summary[k]) if k in summary else '-':>15}" for k in METRICS)
            )

    rows(None)
    finished = [{f.fold for f in r.folds} for r in reports]
    if len(reports) < 2 or all(done == finished[0] for done in finished):
        return "\n".join(lines)
    common = sorted(set.intersection(*finished))
    frames = [{f.fold: sorted(f.images) for f in r.folds if f.fold in common} for r in reports]
    if not common:
        lines.append("no fold is finished by every candidate: the means above are over different folds")
    elif any(held != frames[0] for held in frames):
        lines.append("the candidates' folds hold different frames (another plan): compare them only over all folds")
    else:
        lines.append(f"on the folds every candidate finished ({', '.join(map(str, common))}), like for like:")
        rows(common)
    return "\n".join(lines)
