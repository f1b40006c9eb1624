"""Real training batches as ultralytics' trainer builds them: the dataset's frames in mosaics,
with a recipe's augmentation, collated and scaled to 0-1. For checks and benchmarks of the
training step on real cells, not for training itself (ultralytics' trainer builds its own)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from cellseg.training.recipe import Recipe


def training_batch(data: Path, recipe: Recipe, frames: tuple[int, ...], *, seed: int = 0) -> tuple[dict[str, Any], Any]:
    """``frames`` of the train split of ``data`` (a ``data.yaml``) as one batch, and the ultralytics
    config it was made with (a network's ``args`` for its loss). ultralytics must already be imported
    offline (:func:`cellseg.training.offline.import_ultralytics_offline`)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cfg: Any = get_cfg(overrides={"task": "segment", **recipe.train_args()})
    dataset = check_det_dataset(str(data))
    built: Any = build_yolo_dataset(cfg, dataset["train"], len(frames), dataset, mode="train")
    # Mosaic partners and augmentation draw from Python's and torch's generators.
    random.seed(seed)
    torch.manual_seed(seed)
    batch: dict[str, Any] = built.collate_fn([built[i] for i in frames])
    batch["img"] = batch["img"].float() / 255
    return batch, cfg
