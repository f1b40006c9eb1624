"""Frame sources: files (a watched folder, a list of images), video files, cameras.

Every source yields :class:`SourceFrame` objects until it is exhausted or asked to stop.
File sources never drop a frame; live sources (cameras, streams) keep only the freshest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from cellseg.edge.pipeline.types import Frame


@dataclass(frozen=True)
class SourceFrame:
    """A frame and, for inputs that must be measured exactly once, the key that marks it done."""

    frame: Frame
    done_key: str | None = None


def no_beat() -> None:
    """The heartbeat of a source nobody watches."""


class Source(Protocol):
    """``live``: keeps only its freshest frame (cameras, streams); file sources never drop one.
    ``heartbeat``: called whenever the source makes progress (a frame read, a poll of its folder,
    a reconnection attempt), so that a source stuck inside a read stops the watchdog; the daemon
    sets it, and it is called from whichever thread does the reading."""

    name: str
    live: bool
    heartbeat: Callable[[], None]

    def frames(self) -> Iterator[SourceFrame]: ...

    def stop(self) -> None: ...
