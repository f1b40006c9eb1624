"""Sources on real frames: a video file written from the T98G time-lapse, a watched folder that
is still being written, and cameras that are not there."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellseg.edge.capture.files import FolderSource, file_key
from cellseg.edge.capture.imageio import read_image
from cellseg.edge.capture.video import LiveSource, VideoFileSource, live_source
from cellseg.edge.errors import ConfigError
from cellseg.edge.pipeline.intensity import to_uint8


@pytest.fixture(scope="module")
def timelapse_video(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 12 real frames as a lossless FFV1 video (8-bit, as a camera would record them)."""
    frames = [to_uint8(read_image(p)) for p in sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))]
    path = tmp_path_factory.mktemp("video") / "timelapse.avi"
    h, w = frames[0].shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 2.0, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def test_a_video_file_yields_every_frame(timelapse_video: Path, data_root: Path) -> None:
    frames = [sf.frame for sf in VideoFileSource(timelapse_video).frames()]
    assert len(frames) == 12
    first = to_uint8(read_image(sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[0]))
    assert np.array_equal(frames[0].pixels[:, :, 0], first)  # lossless: the same picture


def test_a_video_file_loops_when_asked(timelapse_video: Path) -> None:
    source = VideoFileSource(timelapse_video, loop=True)
    taken = []
    for sf in source.frames():
        taken.append(sf.frame.seq)
        if len(taken) == 30:
            source.stop()
    assert taken == list(range(30))


def test_a_missing_video_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such video file"):
        list(VideoFileSource(tmp_path / "none.avi").frames())


def test_a_video_as_a_live_stream_gives_only_fresh_frames(timelapse_video: Path) -> None:
    """A slow consumer of a live source sees the latest frame each time, never a backlog."""
    source = LiveSource(str(timelapse_video), "test-stream")
    got = []
    for sf in source.frames():
        got.append(sf.frame)
        time.sleep(0.3)  # far slower than the file decodes
        if len(got) == 3:
            source.stop()
    assert len(got) == 3
    # Meanwhile the reader went on grabbing: the frames in between were replaced, not queued.
    assert source._latest_id > len(got) + 5


def test_a_camera_that_is_not_there_is_retried_not_fatal() -> None:
    source = live_source("v4l2", device="/dev/video-does-not-exist", url=None, pipeline=None, width=None, height=None)
    source.max_backoff_s = 0.2
    frames: list[object] = []
    thread = threading.Thread(target=lambda: frames.extend(source.frames()), daemon=True)
    thread.start()
    deadline = time.time() + 10
    while time.time() < deadline and "cannot open" not in source.last_error:
        time.sleep(0.05)
    assert "v4l2:/dev/video-does-not-exist: cannot open; retrying" in source.last_error
    source.stop()
    thread.join(timeout=5)
    assert not thread.is_alive() and frames == []


def test_rtsp_credentials_stay_out_of_the_source_name() -> None:
    source = live_source("rtsp", device=None, url="rtsp://user:secret@10.0.0.5/stream", pipeline=None, width=None,
                         height=None)  # fmt: skip
    assert "secret" not in source.name and source.name == "rtsp:10.0.0.5/stream"


def test_a_folder_file_is_taken_only_once_it_stops_growing(data_root: Path, tmp_path: Path) -> None:
    src = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[0]
    data = src.read_bytes()
    target = tmp_path / "frame.tif"
    target.write_bytes(data[: len(data) // 3])  # the microscope is still writing
    done: set[str] = set()
    source = FolderSource(tmp_path, pattern="*.tif", is_done=done.__contains__, settle_s=0.6, poll_s=0.1)
    got = []

    def consume() -> None:
        for sf in source.frames():
            got.append(sf)
            assert sf.done_key is not None
            done.add(sf.done_key)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    time.sleep(0.4)
    with open(target, "ab") as f:
        f.write(data[len(data) // 3 :])
    deadline = time.time() + 10
    while time.time() < deadline and not got:
        time.sleep(0.05)
    time.sleep(1.0)  # it must not come a second time
    source.stop()
    thread.join(timeout=5)
    assert len(got) == 1
    assert got[0].done_key == file_key(target)
    assert got[0].frame.pixels.shape == read_image(src).shape  # the complete file, not a truncated one
    shutil.rmtree(tmp_path)


def test_a_folder_file_being_measured_is_not_handed_out_again(data_root: Path, tmp_path: Path) -> None:
    """The done-mark comes only when the measurement is spooled; until then the source itself must
    remember the file, however many polls the measurement takes. A replaced file is new again."""
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[:2]
    shutil.copy(frames[0], tmp_path / "a.tif")
    source = FolderSource(tmp_path, settle_s=0.05, poll_s=0.02)  # nothing is ever marked done
    taken: list[str] = []

    def consume() -> None:
        for sf in source.frames():
            taken.append(Path(sf.frame.source).name)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    time.sleep(1.0)  # fifty polls while "a" is still not done
    assert taken == ["a.tif"]
    shutil.copy(frames[1], tmp_path / "a.tif")  # the microscope software writes a new image there
    time.sleep(1.0)
    source.stop()
    reader.join(5)
    assert taken == ["a.tif", "a.tif"]
