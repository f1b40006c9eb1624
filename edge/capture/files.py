"""File sources: a folder that microscope software writes into, a list of images.

A watched folder measures each image exactly once: a file is taken only when it is completely
written (its size and modification time unchanged over ``settle_s``), and it is skipped when
the spool already holds its done-mark (name, size and mtime), so a restart neither repeats nor
misses a file. Within a run the source also remembers every file it has handed out: the
done-mark is written only once the frame is measured, and a frame that takes longer than a
poll to measure (a slow engine, a huge TIFF) was otherwise read and measured a second time.
An unreadable file is reported once and skipped until it changes.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cellseg.edge.capture import SourceFrame, no_beat
from cellseg.edge.capture.acquisition import Acquired, acquisition_time
from cellseg.edge.capture.imageio import IMAGE_SUFFIXES, read_image
from cellseg.edge.errors import ImageReadError
from cellseg.edge.pipeline.types import Frame

logger = logging.getLogger(__name__)


def file_key(path: Path) -> str:
    st = path.stat()
    return f"file:{path.name}:{st.st_size}:{st.st_mtime_ns}"


def file_frame(pixels: Any, path: Path, seq: int, acquired: Callable[[Path], Acquired]) -> Frame:
    """The frame of an image file, with the time it was taken (its metadata, name or mtime)."""
    try:
        when: Acquired | None = acquired(path)
    except OSError as e:  # gone between reading and looking at it: measured, without a time
        logger.warning("%s: no acquisition time (%s)", path, e.strerror)
        when = None
    return Frame(pixels, source=str(path), timestamp=time.time(), seq=seq,
                 acquired_at=when.at if when else None, acquired_from=when.source if when else "")  # fmt: skip


class ImageListSource:
    """Images in a given order; with ``loop`` they repeat until stopped."""

    def __init__(
        self,
        paths: Sequence[Path],
        loop: bool = False,
        name: str = "images",
        stop: threading.Event | None = None,
        max_pixels: int | None = None,
        *,
        acquired: Callable[[Path], Acquired] = acquisition_time,
    ) -> None:
        self.paths = list(paths)
        self.max_pixels = max_pixels
        self.acquired = acquired
        self.loop = loop
        self.name = name
        self.live = False
        self.heartbeat = no_beat
        self._stop = stop or threading.Event()  # shared with a folder source that delegates here

    def frames(self) -> Iterator[SourceFrame]:
        seq = 0
        while not self._stop.is_set():
            for path in self.paths:
                self.heartbeat()
                if self._stop.is_set():
                    return
                try:
                    pixels = read_image(path, self.max_pixels)
                except ImageReadError as e:
                    logger.error("skipping %s", e)
                    continue
                yield SourceFrame(file_frame(pixels, path, seq, self.acquired))
                seq += 1
            if not self.loop:
                return

    def stop(self) -> None:
        self._stop.set()


class FolderSource:
    """Watches a folder and yields each new, completely written image once.

    Args:
        folder: the folder to watch.
        pattern: file name pattern (``*.tif``).
        is_done: tells whether a done-key was measured already (the spool's record).
        settle_s: how long size and mtime must stay unchanged before a file is read.
        poll_s: how often the folder is listed.
        loop: demo mode: go over the folder's images again and again, ignoring done-marks.
        max_pixels: refuse larger images from their header (reported, skipped until changed).
        acquired: when an image file was taken (default: its metadata, else its mtime).
    """

    def __init__(
        self,
        folder: Path,
        *,
        pattern: str = "*",
        is_done: Callable[[str], bool] = lambda key: False,
        settle_s: float = 1.0,
        poll_s: float = 0.5,
        loop: bool = False,
        max_pixels: int | None = None,
        acquired: Callable[[Path], Acquired] = acquisition_time,
    ) -> None:
        self.folder = Path(folder)
        self.acquired = acquired
        self.max_pixels = max_pixels
        self.pattern = pattern
        self.is_done = is_done
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.loop = loop
        self.name = f"folder:{self.folder}"
        self.live = False
        self.heartbeat = no_beat
        self._stop = threading.Event()
        self._failed: set[str] = set()
        self._handed: set[str] = set()  # keys yielded by this run: measured, or on their way

    def _candidates(self) -> list[Path]:
        try:
            entries = list(self.folder.iterdir())
        except OSError as e:
            logger.error("cannot list %s: %s; retrying", self.folder, e.strerror)
            return []
        return sorted(
            (p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and fnmatch.fnmatch(p.name, self.pattern)),
            key=lambda p: p.name,
        )

    def frames(self) -> Iterator[SourceFrame]:
        if self.loop:
            images = ImageListSource(self._candidates(), True, self.name, self._stop, self.max_pixels,
                                     acquired=self.acquired)  # fmt: skip
            images.heartbeat = self.heartbeat
            yield from images.frames()
            return
        seen: dict[Path, tuple[str, float]] = {}  # path -> (key when first seen unchanged, since)
        seq = 0
        while not self._stop.is_set():
            self.heartbeat()
            now = time.monotonic()
            present: set[str] = set()
            for path in self._candidates():
                try:
                    key = file_key(path)
                except OSError:
                    continue  # vanished between listing and stat
                present.add(key)
                if key in self._handed or key in self._failed or self.is_done(key):
                    continue
                previous = seen.get(path)
                if previous is None or previous[0] != key:
                    seen[path] = (key, now)  # new or still being written: wait for it to settle
                    continue
                if now - previous[1] < self.settle_s:
                    continue
                del seen[path]
                try:
                    pixels = read_image(path, self.max_pixels)
                except ImageReadError as e:
                    logger.error("skipping %s (will retry if the file changes)", e)
                    self._failed.add(key)
                    continue
                self._handed.add(key)
                yield SourceFrame(file_frame(pixels, path, seq, self.acquired), done_key=key)
                seq += 1
                if self._stop.is_set():
                    return
            self._handed &= present  # forget files that are gone (moved away, or replaced)
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
