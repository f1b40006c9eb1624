"""Training the network in bfloat16 on the CPU: the layers run in bfloat16, the loss gets float32,
and nothing of it stays on the model once the epoch is over."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from cellseg.training.cpu_bf16 import NetworkInBf16
from cellseg.training.offline import import_ultralytics_offline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Any:
    ultralytics = import_ultralytics_offline(tmp_path_factory.mktemp("ultralytics"), threads=2)
    return ultralytics.YOLO("yolo11n-seg.yaml", task="segment").model.train()


@pytest.fixture(scope="module")
def frames(usiigaci_dataset: Path) -> torch.Tensor:
    """Two real val frames as a training batch (RGB, 0-1, 256 px)."""
    images = []
    for name in ("set46", "set47"):
        image = cv2.imread(str(usiigaci_dataset / "images" / "val" / f"{name}.png"), cv2.IMREAD_COLOR)
        images.append(cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _dtypes(value: Any) -> set[torch.dtype]:
    if isinstance(value, torch.Tensor):
        return {value.dtype} if value.is_floating_point() else set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return set().union(*(_dtypes(v) for v in value)) if value else set()
    return set()


def _forward(network: Any, frames: torch.Tensor) -> tuple[set[torch.dtype], set[torch.dtype]]:
    """(dtype of a middle convolution's output, dtypes the head hands to the loss)."""
    seen: list[torch.dtype] = []
    probe = network.model[4].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    try:
        out = network(frames)
    finally:
        probe.remove()
    return set(seen), _dtypes(out)


def test_the_layers_run_in_bf16_and_the_loss_gets_float32(network: Any, frames: torch.Tensor) -> None:
    trainer = SimpleNamespace(model=network)
    bf16 = NetworkInBf16()
    assert _forward(network, frames) == ({torch.float32}, {torch.float32})

    bf16.attach(trainer)
    inside, handed_on = _forward(network, frames)
    assert inside == {torch.bfloat16} and handed_on == {torch.float32}
    assert not torch.is_autocast_enabled("cpu")  # left when the head returned, before the loss
    # Gradients reach the float32 weights through the bfloat16 layers.
    network.zero_grad()
    out = network(frames)
    sum(o.float().sum() for o in (out.values() if isinstance(out, dict) else out)
        if isinstance(o, torch.Tensor)).backward()  # fmt: skip
    grad = network.model[0].conv.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0

    # The epoch ends: the hooks go, and the model is float32 again (the EMA and checkpoints never see them).
    bf16.detach(trainer)
    assert _forward(network, frames) == ({torch.float32}, {torch.float32})
    assert not network.model[0]._forward_pre_hooks and not network.model[-1]._forward_hooks


def test_a_forward_that_fails_leaves_no_autocast_behind(network: Any, frames: torch.Tensor) -> None:
    trainer = SimpleNamespace(model=network)
    bf16 = NetworkInBf16()
    bf16.attach(trainer)
    with pytest.raises(RuntimeError):
        network(frames[:, :2])  # two channels: the first convolution refuses, after autocast was entered
    assert torch.is_autocast_enabled("cpu")  # the head never returned ...
    assert _forward(network, frames)[0] == {torch.bfloat16}  # ... the next forward starts afresh
    bf16.attach(trainer)  # a second attach in the same epoch adds nothing
    assert len(network.model[0]._forward_pre_hooks) == 1
    with pytest.raises(RuntimeError):
        network(frames[:, :2])
    bf16.detach(trainer)  # the epoch's end closes what the failed forward left open
    assert not torch.is_autocast_enabled("cpu")


class _Model:
    """What ``_network_precision`` is handed: an ``ultralytics.YOLO`` before ``train``, here only
    its callback registry (the training itself is tested in test_train_offline)."""

    def __init__(self) -> None:
        self.callbacks: list[str] = []

    def add_callback(self, event: str, func: Any) -> None:
        self.callbacks.append(event)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_only_where_the_cpu_computes_it(
    native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Emulated bfloat16 convolutions are many times slower (9x for the nano's forward and backward
    on an AVX2 CPU), so a recipe's cpu_bf16 means float32 on such a CPU, said."""
    from cellseg.training import cpu_bf16
    from cellseg.training.recipe import load_recipe
    from cellseg.training.train import _network_precision

    monkeypatch.setattr(cpu_bf16, "cpu_has_native_bf16", lambda: native)
    model = _Model()
    with caplog.at_level("INFO", logger="cellseg.training.train"):
        dtype = _network_precision(model, load_recipe(None, ["cpu_bf16=true"]))
    assert dtype == ("bfloat16" if native else "float32")
    assert model.callbacks == (["on_train_epoch_start", "on_train_epoch_end", "on_train_end"] if native else [])
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ([] if native else [
        "cpu_bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), and emulated it is many times slower "
        "than float32; the network trains in float32 here"
    ])  # fmt: skip
    assert _network_precision(_Model(), load_recipe(None, [])) == "float32"
