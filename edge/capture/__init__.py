"""Frame sources: files (a watched folder, a list of images), video files, cameras.

Every source yields :class:`SourceFrame` objects until it is exhausted or asked to stop.
File sources never drop a frame; live sources (cameras, streams) keep only the freshest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from cellseg.edge.types import Frame


@dataclass(frozen=True)
class SourceFrame:
    """A frame and, for inputs that must be measured exactly once, the key that marks it done."""

    frame: Frame
    done_key: str | None = None


class Source(Protocol):
    name: str

    def frames(self) -> Iterator[SourceFrame]: ...

    def stop(self) -> None: ...
