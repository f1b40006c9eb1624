"""The source a configuration names (``source:`` in the YAML), made ready to yield frames."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cellseg.edge.capture import Source
from cellseg.edge.capture.acquisition import Acquired, NamePattern, acquisition_rule
from cellseg.edge.capture.files import FolderSource, ImageListSource
from cellseg.edge.capture.video import VideoFileSource, live_source
from cellseg.edge.config import SourceConfig
from cellseg.edge.errors import ConfigError


def acquisition_for(s: SourceConfig) -> Callable[[Path], Acquired]:
    """How the configured source learns when an image file was taken."""
    names = None
    if s.time_from_name is not None:
        t = s.time_from_name
        names = NamePattern(t.pattern, t.format, t.interval_s, t.start)
    return acquisition_rule(names, s.timezone)


def make_source(s: SourceConfig, is_done: Callable[[str], bool]) -> Source:
    """``is_done``: whether a watched file was measured already (the spool's done-marks), so a
    restart measures each file exactly once."""
    acquired = acquisition_for(s)
    if s.kind == "folder" and s.path is not None:
        return FolderSource(s.path, pattern=s.pattern, is_done=is_done, loop=s.loop, max_pixels=s.max_pixels,
                            acquired=acquired)  # fmt: skip
    if s.kind == "images":
        return ImageListSource(s.images, loop=s.loop, max_pixels=s.max_pixels, acquired=acquired)
    if s.kind == "video" and s.path is not None:
        return VideoFileSource(s.path, loop=s.loop)
    if s.kind in ("v4l2", "rtsp", "csi"):
        return live_source(s.kind, device=s.device, url=s.url, pipeline=s.pipeline, width=s.width, height=s.height)
    raise ConfigError(f"source kind '{s.kind}' is missing its settings")
