"""The interface every inference backend implements: load, warm up, infer, close.

Backends: :class:`cellseg.edge.engines.onnxruntime_engine.OnnxRuntimeEngine` (CPU, any machine) and
the TensorRT engine on Jetson. A backend allocates its buffers in ``load`` and frees them in
``close`` (explicitly: ``__del__`` is not guaranteed to run), and is a context manager.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from cellseg.edge.errors import ContractError
from cellseg.edge.pipeline.model_info import ModelInfo


@dataclass(frozen=True)
class RawOutputs:
    """A YOLO-seg model's two outputs for one image.

    Attributes:
        predictions: ``(4 + nc + nm, A)`` float32: box centre x, y, width, height (input
            pixels), nc class scores, nm mask coefficients, for each of A anchors.
        prototypes: ``(nm, ph, pw)`` float32 mask prototypes (``ph = input_height / 4``).
    """

    predictions: npt.NDArray[np.float32]
    prototypes: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        if self.predictions.ndim != 2:
            raise ContractError(f"RawOutputs.predictions must be (4 + nc + nm, A), got {self.predictions.shape}")
        if self.prototypes.ndim != 3:
            raise ContractError(f"RawOutputs.prototypes must be (nm, ph, pw), got {self.prototypes.shape}")
        if self.predictions.shape[0] <= 4 + self.prototypes.shape[0]:
            raise ContractError(
                f"RawOutputs.predictions has {self.predictions.shape[0]} rows, fewer than 4 boxes + "
                f"classes + {self.prototypes.shape[0]} mask coefficients"
            )


class Engine(Protocol):
    """Lifecycle shared by all backends."""

    info: ModelInfo
    engine_id: str
    precision: str

    def load(self) -> None: ...

    def warmup(self, runs: int = 1) -> None: ...

    def infer(self, tensor: npt.NDArray[np.float32]) -> RawOutputs: ...

    def close(self) -> None: ...

    def __enter__(self) -> Engine: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


_Loaded = TypeVar("_Loaded", bound="LoadedInWith")


class LoadedInWith:
    """What backends inherit for ``with engine:``: loaded on entry, closed however the block ends."""

    def load(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Loaded) -> _Loaded:
        self.load()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
