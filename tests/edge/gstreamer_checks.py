"""The CSI/GStreamer path with real pipelines: multifilesrc over real t98g frames and
videotestsrc, through PyGObject (pip's OpenCV has no GStreamer), into LiveSource and the daemon.

Run in its own process by test_gstreamer.py: loading the system's PyGObject into the main test
process made a later ONNX Runtime load of a corrupt model crash (SIGSEGV) there."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.capture.video import LiveSource
from cellseg.edge.config import parse_config
from cellseg.edge.pipeline.intensity import to_uint8
from cellseg.edge.service.daemon import Daemon
from tests.conftest import SHIPPED_MODEL

SYSTEM_SITE = Path("/usr/lib/python3/dist-packages")


def _gst_available() -> bool:
    # Debian's PyGObject lives in the system site packages; appended, so pip's packages still win.
    if SYSTEM_SITE.is_dir() and str(SYSTEM_SITE) not in sys.path:
        sys.path.append(str(SYSTEM_SITE))
    try:
        import gi

        gi.require_version("Gst", "1.0")
        from gi.repository import Gst

        Gst.init(None)
        return all(Gst.ElementFactory.find(e) for e in ("appsink", "multifilesrc", "pngdec", "videotestsrc"))
    except (ImportError, ValueError):
        return False


pytestmark = pytest.mark.skipif(not _gst_available(), reason="PyGObject with GStreamer base/good plugins missing")


@pytest.fixture
def png_frames(data_root: Path, tmp_path: Path) -> list[np.ndarray]:
    frames = []
    for i, tif in enumerate(sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))):
        image = to_uint8(read_image(tif))
        cv2.imwrite(str(tmp_path / f"frame{i:02d}.png"), image)
        frames.append(image)
    return frames


def _pipeline(folder: Path, count: int) -> str:
    return (f"multifilesrc location={folder}/frame%02d.png index=0 stop-index={count - 1} "
            "caps=image/png,framerate=4/1 ! pngdec ! videoconvert ! video/x-raw,format=GRAY8 ! "
            "appsink name=sink sync=true")  # fmt: skip


def test_a_multifilesrc_pipeline_delivers_the_real_frames(png_frames: list[np.ndarray], tmp_path: Path) -> None:
    source = LiveSource(_pipeline(tmp_path, len(png_frames)), "csi", gstreamer=True, max_backoff_s=1.0)
    got: list[Any] = []
    for sf in source.frames():
        got.append(sf.frame)
        if len(got) == 6:
            source.stop()
    matches = [next(i for i, f in enumerate(png_frames) if np.array_equal(f, frame.pixels)) for frame in got]
    assert matches == sorted(matches) and len(set(matches)) == len(matches)  # real frames, in order, no repeats
    assert [f.seq for f in got] == list(range(6)) and all(f.source == "csi" for f in got)


def test_videotestsrc_colour_frames_and_a_bad_pipeline(tmp_path: Path) -> None:
    source = LiveSource("videotestsrc num-buffers=50 ! video/x-raw,format=BGRx,width=321,height=241 ! appsink",
                        "csi", gstreamer=True, max_backoff_s=1.0)  # fmt: skip
    frame = next(iter(source.frames())).frame
    source.stop()
    assert frame.pixels.shape == (241, 321, 3) and frame.pixels.dtype == np.uint8
    bad = LiveSource("videotestsrc ! no_such_element ! appsink", "csi", gstreamer=True)
    reader = threading.Thread(target=bad._reader)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive() and "does not parse" in bad.last_error


def test_the_daemon_measures_a_csi_pipeline(png_frames: list[np.ndarray], tmp_path: Path) -> None:
    config = parse_config({
        "device_id": "csi-1", "model": str(SHIPPED_MODEL), "state_dir": str(tmp_path / "state"),
        "engine": {"threads": 2},
        "source": {"kind": "csi", "pipeline": _pipeline(tmp_path, len(png_frames))},
        "mqtt": {"enabled": False},
    })  # fmt: skip
    records: list[dict[str, Any]] = []
    daemon: Daemon

    def echo(record: dict[str, Any]) -> None:
        records.append(record)
        if len(records) == 3:
            daemon.request_stop()

    daemon = Daemon(config, echo=echo)
    assert daemon.run() == 0
    assert len(records) == 3 and all(r["count"] > 0 and r["source"] == "csi" for r in records)
    assert [r["seq"] for r in records] == [1, 2, 3]
