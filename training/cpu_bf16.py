"""Training in bfloat16 on a CPU that computes it natively (AVX512-BF16, AMX).

On such a CPU, torch's bfloat16 autocast runs the network's convolutions about twice as fast
as float32 (forward and backward of YOLO11n-seg at 1024 px, batch 4, on a 2-core Zen 5: 1.3 s
against 3.0 s a step; YOLOv9c-seg at 640 px: 4.3 s against 10 s). A whole epoch also loads
data and computes the loss: 1.2x faster for the nano at 640 px, 1.5x at 1024 px.

ultralytics offers bfloat16 on CUDA only, and there it autocasts the loss as well: the anchors,
box decoding and assignment then run in bfloat16, whose 8-bit mantissa cannot hold a coordinate
such as 159.5.

So only the network runs under autocast: it is entered when the first layer is called and left
when the head returns, whose outputs are handed to the loss in float32. The weights, the
optimiser and the EMA stay float32. The hooks sit on the training model during training epochs
only: the EMA (validated, and saved in every checkpoint) never carries them, so checkpoints load
anywhere without this module.
"""

from __future__ import annotations

from typing import Any

import torch

from cellseg.edge.device import NATIVE_BF16, cpu_flags


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & set(NATIVE_BF16))


def _as_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _as_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float32(v) for v in value)
    return value


class NetworkInBf16:
    """ultralytics callbacks that run the training model's layers under CPU bfloat16 autocast."""

    def __init__(self) -> None:
        self._autocast: torch.autocast | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def register(self, model: Any) -> None:
        """Hook onto an ``ultralytics.YOLO`` before ``train``."""
        model.add_callback("on_train_epoch_start", self.attach)
        model.add_callback("on_train_epoch_end", self.detach)
        model.add_callback("on_train_end", self.detach)

    def attach(self, trainer: Any) -> None:
        if self._handles:
            return
        layers = getattr(trainer.model, "module", trainer.model).model  # the nn.Sequential of layers
        self._handles = [
            layers[0].register_forward_pre_hook(self._enter),
            layers[-1].register_forward_hook(self._leave),
        ]

    def detach(self, trainer: Any = None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._close()

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        self._close()  # a forward that raised never reached the head: leave its autocast first
        self._autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        self._autocast.__enter__()  # type: ignore[no-untyped-call]  # torch leaves __enter__ unannotated

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        self._close()
        return _as_float32(output)

    def _close(self) -> None:
        if self._autocast is not None:
            self._autocast.__exit__(None, None, None)
            self._autocast = None
