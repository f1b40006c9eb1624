"""Real training batches as ultralytics' trainer builds them (the dataset's frames in mosaics, with
a recipe's augmentation, collated and scaled to 0-1), and one training step on them. For checks
and benchmarks of the training step on real cells, not for training itself (ultralytics' trainer
builds its own)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from cellseg.training.mask_loss import BoxMaskLoss
from cellseg.training.recipe import Recipe


@dataclass(frozen=True)
class Step:
    """One training step: the loss's items (ultralytics' names) and each part's seconds."""

    items: dict[str, float]
    forward_s: float
    loss_s: float
    backward_s: float


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


def training_network(ultralytics: Any, model: str, cfg: Any) -> Any:
    """``model`` (an architecture YAML or weights) as a trainable float32 network in training mode,
    with ``cfg`` as its ``args`` (its loss reads them), every parameter taking gradients."""
    network = ultralytics.YOLO(model, task="segment").model.float().train()
    network.args = cfg
    for p in network.parameters():
        p.requires_grad_(True)
    return network


def training_step(network: Any, batch: dict[str, Any], *, in_boxes: bool) -> Step:
    """Forward, loss and backward of ``network`` on ``batch``, with a fresh criterion: ultralytics'
    mask loss, or with ``in_boxes`` cellseg's (:mod:`cellseg.training.mask_loss`). The gradients
    are left on the parameters."""
    network.criterion = network.init_criterion()
    if in_boxes:
        BoxMaskLoss().attach(SimpleNamespace(model=network))
    network.zero_grad()
    started = time.perf_counter()
    preds = network(batch["img"])
    forward = time.perf_counter()
    loss, items = network.loss(batch, preds)
    lossed = time.perf_counter()
    loss.sum().backward()
    done = time.perf_counter()
    values = {name: float(value) for name, value in items.items()}
    return Step(values, forward - started, lossed - forward, done - lossed)
