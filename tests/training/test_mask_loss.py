"""The mask loss computed inside each box gives ultralytics' loss and gradients, on real training
batches of the Usiigaci frames through the shipped model, in both mask forms ultralytics has."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cellseg.training.batches import training_batch, training_network, training_step
from cellseg.training.mask_loss import BoxMaskLoss, box_mask_loss
from cellseg.training.offline import import_ultralytics_offline
from cellseg.training.recipe import load_recipe

from ..conftest import SHIPPED_WEIGHTS

pytestmark = pytest.mark.slow

# Four frames of the train split whose mosaics hold between them a few hundred cells.
FRAMES = (0, 5, 11, 17)


@pytest.fixture(scope="module")
def ultralytics(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return import_ultralytics_offline(tmp_path_factory.mktemp("ultralytics"), threads=2)


def _batch(dataset: Path, *, imgsz: int, overlap: bool) -> tuple[dict[str, Any], Any]:
    """A training batch of the shipped recipe as ultralytics' trainer makes it, and its cfg."""
    recipe = load_recipe(Path("usiigaci-yolo11n-seg-cpu.yaml"), [f"imgsz={imgsz}", f"overlap_mask={overlap}"])
    return training_batch(dataset / "data.yaml", recipe, FRAMES)


def _network(ultralytics: Any, cfg: Any) -> Any:
    return training_network(ultralytics, str(SHIPPED_WEIGHTS), cfg)


def _loss_and_gradients(network: Any, batch: dict[str, Any], *, in_boxes: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    items = training_step(network, batch, in_boxes=in_boxes).items
    return items, {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("imgsz", "overlap"), [(640, True), (640, False), (1024, True)])
def test_loss_and_gradients_are_ultralytics(
    ultralytics: Any, usiigaci_dataset: Path, imgsz: int, overlap: bool
) -> None:
    batch, cfg = _batch(usiigaci_dataset, imgsz=imgsz, overlap=overlap)
    assert len(batch["cls"]) > 100  # real cells, many per image
    network = _network(ultralytics, cfg)
    theirs, their_grads = _loss_and_gradients(network, batch, in_boxes=False)
    ours, our_grads = _loss_and_gradients(network, batch, in_boxes=True)
    assert "calculate_segmentation_loss" in network.criterion.__dict__

    assert float(theirs["seg_loss"]) > 0.1
    assert float(ours["seg_loss"]) == pytest.approx(float(theirs["seg_loss"]), rel=1e-5)
    for name in ("box_loss", "cls_loss", "dfl_loss"):
        assert float(ours[name]) == float(theirs[name])
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 200
    # Every gradient, through the whole network, equal to float32 rounding of the sums' order
    # (some layers' gradients are exactly zero in theory and rounding noise in practice: hence a
    # tolerance on the scale of the largest gradient, not of each tensor).
    scale = max(float(g.abs().max()) for g in their_grads.values())
    worst = max(float((our_grads[n] - their_grads[n]).abs().max()) for n in their_grads)
    assert worst <= 1e-4 * scale
    # The mask head's own parameters move: the equality is not that of two zero gradients.
    proto_grads = [g for n, g in our_grads.items() if ".proto." in n]
    assert proto_grads and all(float(g.abs().max()) > 0 for g in proto_grads)


def _criterion_inputs(ultralytics: Any, usiigaci_dataset: Path) -> dict[str, Any]:
    """The arguments ultralytics' criterion hands its mask loss, captured on a real batch."""
    batch, cfg = _batch(usiigaci_dataset, imgsz=640, overlap=True)
    network = _network(ultralytics, cfg)
    network.criterion = network.init_criterion()
    captured: dict[str, Any] = {}
    names = ("fg_mask", "masks", "target_gt_idx", "target_bboxes", "batch_idx", "proto", "pred_masks", "imgsz")

    def capture(*args: Any) -> torch.Tensor:
        captured.update(zip(names, args, strict=True))
        return torch.zeros(())

    network.criterion.calculate_segmentation_loss = capture
    network.loss(batch, network(batch["img"]))
    return {k: v.detach() for k, v in captured.items()}


def test_chunks_and_images_without_cells(ultralytics: Any, usiigaci_dataset: Path) -> None:
    inputs = _criterion_inputs(ultralytics, usiigaci_dataset)
    from ultralytics.utils.loss import v8SegmentationLoss

    criterion = SimpleNamespace(overlap=True, single_mask_loss=v8SegmentationLoss.single_mask_loss)

    def theirs(**changed: Any) -> torch.Tensor:
        args = {**inputs, **changed}
        return v8SegmentationLoss.calculate_segmentation_loss(criterion, *(args[k] for k in list(inputs)))  # type: ignore[no-any-return]

    whole = box_mask_loss(**inputs, overlap=True)
    assert float(whole) == pytest.approx(float(theirs()), rel=1e-5)
    # Boxes on whole prototype pixels (the 160-px grid of a 640-px input): a box's edges are kept
    # or left exactly as ultralytics keeps them (x1 <= c < x2).
    on_grid = (inputs["target_bboxes"] / 4).round() * 4
    assert float(box_mask_loss(**{**inputs, "target_bboxes": on_grid}, overlap=True)) == pytest.approx(
        float(theirs(target_bboxes=on_grid)), rel=1e-5
    )
    # One object per chunk, and chunks of a few objects padded to the largest: the same loss.
    for budget in (1, 100_000):
        chunked = box_mask_loss(**inputs, overlap=True, chunk_elements=budget)
        assert float(chunked) == pytest.approx(float(whole), rel=1e-5)

    # An image whose anchors are all background (a frame with no cells): its share is zero, the
    # others' unchanged, and the prototypes stay in the graph.
    fg_mask = inputs["fg_mask"].clone()
    fg_mask[1] = False
    proto = inputs["proto"].clone().requires_grad_(True)
    ours = box_mask_loss(**{**inputs, "fg_mask": fg_mask, "proto": proto}, overlap=True)
    assert float(ours.detach()) == pytest.approx(float(theirs(fg_mask=fg_mask)), rel=1e-5)
    ours.backward()
    assert proto.grad is not None and float(proto.grad[1].abs().max()) == 0.0 and float(proto.grad[0].abs().max()) > 0


def test_only_the_training_criterion_changes(ultralytics: Any) -> None:
    from ultralytics.cfg import get_cfg

    network = _network(ultralytics, get_cfg(overrides={"task": "segment"}))
    trainer = SimpleNamespace(model=network)
    hook = BoxMaskLoss()
    hook.attach(trainer)  # the criterion is built when ultralytics has not built it yet
    patched = network.criterion.__dict__["calculate_segmentation_loss"]
    hook.attach(trainer)  # every epoch: patched once
    assert network.criterion.__dict__["calculate_segmentation_loss"] is patched
    # The class, and so every other criterion (the EMA's, a validator's), keep ultralytics' loss.
    fresh = network.init_criterion()
    assert "calculate_segmentation_loss" not in fresh.__dict__
    # ultralytics may build the criterion again (a resumed end-to-end head); the next epoch patches it.
    network.criterion = fresh
    hook.attach(trainer)
    assert "calculate_segmentation_loss" in network.criterion.__dict__
