"""Video sources through OpenCV: video files, and live cameras or streams (V4L2, RTSP, CSI).

A video file yields every frame (it never drops one). A live source keeps only the freshest
frame: a reader thread grabs continuously and the pipeline takes the latest, so a slow
measurement never works on a stale picture. A camera that fails to open or vanishes is retried
with exponential backoff and reported; it never ends the daemon.

CSI cameras on a Jetson go through GStreamer (``nvarguscamerasrc``), which needs an OpenCV
built with it (JetPack's; pip's OpenCV has none): the error says so when it is missing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from cellseg.edge.capture import SourceFrame, no_beat
from cellseg.edge.capture.imageio import normalise_layout
from cellseg.edge.errors import ConfigError, DependencyError
from cellseg.edge.pipeline.types import Frame

logger = logging.getLogger(__name__)

DEFAULT_CSI_PIPELINE = (
    "nvarguscamerasrc ! video/x-raw(memory:NVMM),width={width},height={height} ! "
    "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1"
)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise DependencyError("opencv-python", "cpu", "video and camera sources") from e
    return cv2


class VideoFileSource:
    """Every frame of a video file, in order; with ``loop`` it starts again at the end."""

    def __init__(self, path: Path, loop: bool = False) -> None:
        self.path = Path(path)
        self.loop = loop
        self.name = f"video:{self.path}"
        self.live = False
        self.heartbeat = no_beat
        self._stop = threading.Event()

    def frames(self) -> Iterator[SourceFrame]:
        cv2 = _cv2()
        seq = 0
        while not self._stop.is_set():
            if not self.path.is_file():
                raise ConfigError(f"{self.path}: no such video file")
            capture = cv2.VideoCapture(str(self.path))
            if not capture.isOpened():
                raise ConfigError(f"{self.path}: OpenCV cannot open this video")
            try:
                while not self._stop.is_set():
                    self.heartbeat()
                    ok, image = capture.read()
                    if not ok:
                        break
                    pixels = normalise_layout(image, self.path)
                    # A recorded video says nothing reliable of when each frame was taken: no acquired_at.
                    frame = Frame(pixels, source=f"{self.path}#{seq}", timestamp=time.time(), seq=seq)
                    yield SourceFrame(frame)
                    seq += 1
            finally:
                capture.release()
            if not self.loop:
                return

    def stop(self) -> None:
        self._stop.set()


class LiveSource:
    """A camera or stream that keeps only its freshest frame, reconnecting with backoff.

    ``live = True`` tells the daemon to replace, not queue, frames it has not taken yet.

    Args:
        target: what ``cv2.VideoCapture`` opens: a device path or index, an RTSP URL, or a
            GStreamer pipeline (with ``gstreamer=True``).
        name: for logs and reports.
    """

    def __init__(self, target: str | int, name: str, gstreamer: bool = False, max_backoff_s: float = 60.0) -> None:
        self.target = target
        self.name = name
        self.gstreamer = gstreamer
        self.max_backoff_s = max_backoff_s
        self.live = True
        self.heartbeat = no_beat  # beaten by the reader thread: a read that hangs stops it
        self.last_error = ""
        self._stop = threading.Event()
        self._fresh = threading.Condition()
        self._latest: Any = None
        self._latest_id = 0

    def _open(self, cv2: Any) -> Any:
        if self.gstreamer:
            if _has_gstreamer(cv2):  # JetPack's OpenCV
                return cv2.VideoCapture(str(self.target), cv2.CAP_GSTREAMER)
            from cellseg.edge.capture.gstreamer import GstCapture

            return GstCapture(str(self.target))  # pip's OpenCV has no GStreamer: PyGObject
        return cv2.VideoCapture(self.target)

    def _reader(self) -> None:
        cv2 = _cv2()
        backoff = 1.0
        while not self._stop.is_set():
            self.heartbeat()
            try:
                capture = self._open(cv2)
            except (DependencyError, ConfigError) as e:  # retrying cannot help: say so and end
                self.last_error = str(e)
                logger.error("%s", e)
                return
            if not capture.isOpened():
                self.last_error = f"{self.name}: cannot open; retrying in {backoff:.0f} s"
                logger.warning("%s", self.last_error)
                self._wait_beating(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            logger.info("%s: opened", self.name)
            backoff = 1.0
            while not self._stop.is_set():
                self.heartbeat()
                try:
                    ok, image = capture.read()
                except ConfigError as e:  # e.g. a pipeline delivering a pixel format we cannot take
                    self.last_error = f"{self.name}: {e}"
                    logger.error("%s", self.last_error)
                    capture.release()
                    return
                if not ok:
                    self.last_error = f"{self.name}: stopped delivering frames; reconnecting"
                    logger.warning("%s", self.last_error)
                    break
                with self._fresh:
                    self._latest = image  # older frames are simply replaced: live sources drop
                    self._latest_id += 1
                    self._fresh.notify_all()
            capture.release()

    def _wait_beating(self, seconds: float) -> None:
        """Back off before reconnecting: a camera that is away is retried, not a stall."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.heartbeat()
            self._stop.wait(min(1.0, deadline - time.monotonic()))

    def frames(self) -> Iterator[SourceFrame]:
        reader = threading.Thread(target=self._reader, name=f"reader {self.name}", daemon=True)
        reader.start()
        taken, seq = 0, 0
        while not self._stop.is_set():
            with self._fresh:
                self._fresh.wait_for(partial(self._newer_than, taken), timeout=1.0)
                if self._latest_id == taken:
                    continue
                image, taken = self._latest, self._latest_id
            now = time.time()
            frame = Frame(normalise_layout(image, self.name), source=self.name, timestamp=now, seq=seq,
                          acquired_at=now, acquired_from="capture")  # fmt: skip
            yield SourceFrame(frame)
            seq += 1

    def _newer_than(self, taken: int) -> bool:
        return self._latest_id != taken or self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        with self._fresh:
            self._fresh.notify_all()


def _has_gstreamer(cv2: Any) -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def live_source(kind: str, *, device: str | None, url: str | None, pipeline: str | None, width: int | None,
                height: int | None) -> LiveSource:  # fmt: skip
    """The live source a config's ``source`` section asks for."""
    if kind == "v4l2" and device is not None:
        target: str | int = int(device) if device.isdigit() else device
        return LiveSource(target, f"v4l2:{device}")
    if kind == "rtsp" and url is not None:
        return LiveSource(url, "rtsp:" + url.split("@")[-1])  # no credentials in logs
    if kind == "csi":
        text = pipeline or DEFAULT_CSI_PIPELINE.format(width=width or 1920, height=height or 1080)
        return LiveSource(text, "csi", gstreamer=True)
    raise ConfigError(f"source kind '{kind}' is not a live source")
