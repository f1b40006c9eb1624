"""``cellseg train``: train a YOLO-seg model offline from a recipe, resumably, with a run manifest.

A run directory holds ultralytics' own output (``weights/best.pt``, ``weights/last.pt``,
``results.csv``, plots) plus ``recipe.yaml`` (the resolved recipe) and ``manifest.json``:
recipe, dataset hash, package versions, training time, best epoch and its metrics.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cellseg.edge.errors import ConfigError, DatasetError
from cellseg.training.mask_loss import MASK_LOSS, BoxMaskLoss
from cellseg.training.offline import import_ultralytics_offline
from cellseg.training.recipe import Recipe
from cellseg.training.yolo_dataset import dataset_hash, load_data_yaml

logger = logging.getLogger(__name__)

# ultralytics' own model-selection weights: 0.1 x mAP50 + 0.9 x mAP50-95, box and mask.
_FITNESS_COLUMNS = {
    "metrics/mAP50(B)": 0.1,
    "metrics/mAP50-95(B)": 0.9,
    "metrics/mAP50(M)": 0.1,
    "metrics/mAP50-95(M)": 0.9,
}


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_weights: Path
    manifest: dict[str, Any]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("cellseg", "ultralytics", "torch", "torchvision", "numpy", "opencv-python", "onnx", "onnxruntime"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def read_results(run_dir: Path) -> list[dict[str, float]]:
    """Rows of ultralytics' ``results.csv`` as floats, keys stripped of padding."""
    path = Path(run_dir) / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k.strip(): float(v) for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(f)]


def best_epoch(rows: list[dict[str, float]]) -> dict[str, float] | None:
    """The row ultralytics' fitness picks as best (that of ``best.pt``)."""
    scored = [r for r in rows if all(c in r for c in _FITNESS_COLUMNS)]
    if not scored:
        return None
    return max(scored, key=lambda r: sum(w * r[c] for c, w in _FITNESS_COLUMNS.items()))


def train(recipe: Recipe, data: Path, run_dir: Path, resume: bool = False) -> TrainResult:
    """Train (or resume) a run. Blocks until training ends; ultralytics prints progress.

    Args:
        recipe: the resolved recipe.
        data: a dataset's ``data.yaml`` (see :mod:`cellseg.training.yolo_dataset`).
        run_dir: output folder; with ``resume`` it must hold ``weights/last.pt``.
    """
    run_dir = Path(run_dir).resolve()
    data = Path(data).resolve()
    dataset = load_data_yaml(data)  # fails early, with the dataset's path, on a bad dataset
    last = run_dir / "weights" / "last.pt"
    if resume and not last.is_file():
        raise ConfigError(f"cannot resume: {last} does not exist")
    if not resume and last.exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run")
    model_path = Path(recipe.model)
    if recipe.model.endswith(".pt") and not model_path.is_file():
        raise ConfigError(
            f"weights {recipe.model} not found; pretrained weights are never downloaded: "
            "give a local .pt path, or an architecture .yaml to train from scratch"
        )

    run_dir.mkdir(parents=True, exist_ok=True)
    ultralytics = import_ultralytics_offline(run_dir / ".ultralytics", threads=recipe.threads or os.cpu_count())
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(), sort_keys=False))
    started = time.time()
    if resume:
        logger.info("resuming %s from %s", run_dir, last)
        model = ultralytics.YOLO(str(last))
        dtype = _training_hooks(model, recipe)
        model.train(resume=True)
    else:
        model = ultralytics.YOLO(recipe.model, task="segment")
        dtype = _training_hooks(model, recipe)
        model.train(
            data=str(data), project=str(run_dir.parent), name=run_dir.name, exist_ok=True, **recipe.train_args()
        )
    elapsed = time.time() - started

    best = run_dir / "weights" / "best.pt"
    if not best.is_file():
        raise DatasetError(f"training ended without writing {best}; see ultralytics' output above")
    rows = read_results(run_dir)
    previous = _read_manifest(run_dir)
    manifest = {
        "recipe": recipe.model_dump(),
        "data": str(data),
        "dataset_sha256": dataset_hash(Path(dataset["path"])),
        "class_names": dataset["names"],
        "versions": package_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "train_seconds": round(elapsed + float(previous.get("train_seconds", 0.0)), 1),
        # Every dtype the network trained in, in order: a run resumed on another CPU may change it.
        "network_dtype": list(dict.fromkeys([*previous.get("network_dtype", []), dtype])),
        # And the mask loss's form (the same numbers either way; runs before this one used ultralytics').
        "mask_loss": list(dict.fromkeys([*previous.get("mask_loss", []), MASK_LOSS])),
        "epochs_completed": len(rows),
        "best_epoch": best_epoch(rows),
        "best_weights": str(best),
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return TrainResult(run_dir, best, manifest)


def _training_hooks(model: Any, recipe: Recipe) -> str:
    """cellseg's callbacks on ``model`` before it trains (or resumes); the dtype its network trains in."""
    BoxMaskLoss().register(model)
    return _network_precision(model, recipe)


def _network_precision(model: Any, recipe: Recipe) -> str:
    """The dtype the network trains in: bfloat16 with ``cpu_bf16`` on a CPU that computes it
    natively, else float32 (a resumed run keeps its recipe's choice, and this machine's answer).

    Without AVX512-BF16 or AMX, torch emulates bfloat16 convolutions: on a 2-core Zen 3 (AVX2) a
    forward and backward of the nano at 320 px ran 9x slower than in float32 (4.1 s against
    0.45 s), and a training step at 1024 px took 843 s (with a test run beside it) against 18 s.
    So there the recipe's ``cpu_bf16`` falls back to float32, said and recorded in the manifest,
    and a recipe stays usable on every machine a CV or a resumed run passes through."""
    if not recipe.cpu_bf16:
        return "float32"
    from cellseg.training.cpu_bf16 import NetworkInBf16, cpu_has_native_bf16

    if not cpu_has_native_bf16():
        logger.warning(
            "cpu_bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), and emulated it is many times "
            "slower than float32; the network trains in float32 here"
        )
        return "float32"
    logger.info("cpu_bf16: the network trains in bfloat16; weights, optimiser and loss in float32")
    NetworkInBf16().register(model)
    return "bfloat16"


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if path.is_file():
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded
    return {}
