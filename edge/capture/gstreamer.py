"""GStreamer pipelines through PyGObject: CSI cameras (``nvarguscamerasrc``) where OpenCV has no
GStreamer (pip's wheels never do; JetPack's OpenCV does, and is used when present).

:class:`GstCapture` has the three methods :class:`~cellseg.edge.capture.video.LiveSource` uses
of ``cv2.VideoCapture`` (``isOpened``, ``read``, ``release``), so reconnection, backoff and
freshest-frame semantics are shared. The pipeline must end in an ``appsink`` (named ``sink``,
or the only one); it is set to keep one buffer and drop older ones. Raw formats GRAY8,
GRAY16_LE, BGR, BGRx and BGRA become numpy frames; anything else is a clear error.

PyGObject comes from the system (``python3-gi``, ``gir1.2-gst-plugins-base-1.0``): a virtual
environment must see system site packages (``--system-site-packages``) to use it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.errors import ConfigError, DependencyError

logger = logging.getLogger(__name__)

PULL_TIMEOUT_S = 5.0
_LAYOUTS = {  # format -> (dtype, channels kept, channels in the buffer)
    "GRAY8": (np.uint8, 1, 1),
    "GRAY16_LE": (np.uint16, 1, 1),
    "BGR": (np.uint8, 3, 3),
    "BGRx": (np.uint8, 3, 4),
    "BGRA": (np.uint8, 3, 4),
}


def _gst() -> Any:
    try:
        import gi

        gi.require_version("Gst", "1.0")
        from gi.repository import Gst
    except (ImportError, ValueError) as e:
        raise DependencyError(
            "PyGObject with GStreamer (python3-gi, gir1.2-gst-plugins-base-1.0)", "edge", "a GStreamer pipeline source"
        ) from e
    Gst.init(None)
    return Gst


class GstCapture:
    """One run of a pipeline; ``read`` returns ``(False, None)`` at end of stream or on a stall."""

    def __init__(self, pipeline: str) -> None:
        gst = _gst()
        self._gst = gst
        self._opened = False
        try:
            self._pipeline = gst.parse_launch(pipeline)
        except Exception as e:  # GLib.Error for a malformed description or a missing element
            raise ConfigError(f"GStreamer pipeline does not parse: {e}") from e
        self._sink = self._pipeline.get_by_name("sink") or self._find_appsink()
        if self._sink is None:
            raise ConfigError("GStreamer pipeline must end in an appsink (e.g. '... ! appsink name=sink')")
        self._sink.set_property("max-buffers", 1)
        self._sink.set_property("drop", True)  # a live source keeps only the freshest frame
        result = self._pipeline.set_state(gst.State.PLAYING)
        self._opened = result != gst.StateChangeReturn.FAILURE
        if not self._opened:
            self._pipeline.set_state(gst.State.NULL)

    def _find_appsink(self) -> Any:
        found = None
        iterator = self._pipeline.iterate_sinks()
        while True:
            ok, element = iterator.next()
            if ok != self._gst.IteratorResult.OK:
                return found
            if element.get_factory().get_name() == "appsink":
                found = element

    def isOpened(self) -> bool:  # noqa: N802 -- cv2.VideoCapture's name
        return self._opened

    def read(self) -> tuple[bool, npt.NDArray[Any] | None]:
        sample = self._sink.emit("try-pull-sample", int(PULL_TIMEOUT_S * 1e9))
        if sample is None:
            return False, None
        structure = sample.get_caps().get_structure(0)
        fmt = structure.get_value("format")
        width, height = structure.get_value("width"), structure.get_value("height")
        if fmt not in _LAYOUTS:
            raise ConfigError(
                f"GStreamer delivers {fmt}; end the pipeline with videoconvert to GRAY8, GRAY16_LE or BGR"
            )
        dtype, keep, channels = _LAYOUTS[fmt]
        buffer = sample.get_buffer()
        ok, info = buffer.map(self._gst.MapFlags.READ)
        if not ok:
            return False, None
        try:
            data = np.frombuffer(info.data, dtype=np.uint8)
            stride = data.size // height  # rows may be padded to 4 bytes
            rows = data[: stride * height].reshape(height, stride)[:, : width * channels * np.dtype(dtype).itemsize]
            image = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
        finally:
            buffer.unmap(info)
        return True, image[:, :, 0].copy() if keep == 1 else image[:, :, :keep].copy()

    def release(self) -> None:
        self._pipeline.set_state(self._gst.State.NULL)
