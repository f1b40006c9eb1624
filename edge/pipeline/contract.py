"""The one contract every backend's pipeline keeps: a frame in, a :class:`FrameResult` out.

A backend (:mod:`cellseg.edge.engines.registry`) pairs an engine with the pipeline that runs
frames through it: the host pipeline (:class:`~cellseg.edge.pipeline.host.HostPipeline`: numpy
and OpenCV around any engine that returns raw outputs to the host) or one of its own (the CUDA
pipeline keeps tensors on the GPU). Whatever runs inside, the daemon, ``predict``, ``bench``
and the flash self-test see only this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cellseg.edge.engines.base import Engine
from cellseg.edge.pipeline.types import Detections, Frame, Measurement


@dataclass(frozen=True)
class FrameResult:
    """One frame's outcome: its detections (masks included when they are on the host: always
    for the host pipeline, on request for the CUDA one) and its measurement, made by
    :func:`cellseg.edge.pipeline.measure.measure` with each stage's latency."""

    detections: Detections
    measurement: Measurement


class Pipeline(Protocol):
    """Frames through one loaded engine. ``want_masks``: copy the cropped masks to the host
    (overlays, label images); a pipeline whose masks are on the host anyway returns them always."""

    @property
    def engine(self) -> Engine: ...

    def __call__(self, frame: Frame, *, want_masks: bool = False) -> FrameResult: ...

    def engine_rate(self, frame: Frame, count: int) -> float:
        """Images/s of the engine alone: ``count`` inferences of ``frame``'s prepared input (for
        ``cellseg bench``, beside the end-to-end rate)."""
        ...
