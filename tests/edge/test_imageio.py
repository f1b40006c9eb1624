"""Image headers and the pixel limit: an image file larger than allowed is refused from its header,
before a byte of it is decoded, in `read_image` and in a running daemon's watched folder."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cellseg.edge.capture.imageio import image_size, read_image
from cellseg.edge.errors import ImageReadError
from tests.daemon_setup import folder_device
from tests.mqtt_broker import Broker, Subscriber


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 8-bit grey PNG of zeros, written row by row: a few megabytes on disk that decode
    to width x height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(1)
    row = b"\x00" * (width + 1)  # filter byte, then the row
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        for _ in range(height):
            data = packer.compress(row)
            if data:
                f.write(chunk(b"IDAT", data))
        f.write(chunk(b"IDAT", packer.flush()) + chunk(b"IEND", b""))
    return path


def _write(path: Path, image: np.ndarray, **tiff: object) -> Path:
    if tiff:
        tifffile.imwrite(path, image, **tiff)  # type: ignore[arg-type]
    else:
        assert cv2.imwrite(str(path), image)
    return path


@pytest.mark.parametrize(
    ("name", "dtype", "tiff"),
    [("a.png", np.uint16, {}), ("a.tif", np.uint16, {}), ("a.jpg", np.uint8, {}), ("a.bmp", np.uint8, {}),
     ("big.tif", np.uint16, {"bigtiff": True}), ("motorola.tif", np.uint16, {"byteorder": ">"})],
)  # fmt: skip
def test_the_size_comes_from_the_header_of_each_format(tmp_path: Path, name: str, dtype: type, tiff: dict) -> None:
    image = np.zeros((123, 457), dtype)
    assert image_size(_write(tmp_path / name, image, **tiff)) == (457, 123)


def test_real_microscope_frames_and_damaged_headers(data_root: Path, tmp_path: Path) -> None:
    frame = data_root / "t98g_timelapse" / "frames" / "20180101ef002xy01t01.tif"
    assert image_size(frame) == (1024, 1022) and read_image(frame).shape == (1022, 1024)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(frame.read_bytes()[:6])
    assert image_size(cut) is None  # the decoder will say what is wrong
    (tmp_path / "x.gif").write_bytes(b"GIF89a" + b"\0" * 20)
    assert image_size(tmp_path / "x.gif") is None


def test_an_oversized_image_is_refused_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = huge_png(tmp_path / "huge.png", 20000, 20000)
    assert big.stat().st_size < 5_000_000
    monkeypatch.setattr(cv2, "imread", lambda *a: pytest.fail("decoded an image it should have refused"))
    with pytest.raises(ImageReadError, match=r"20000x20000 is 400 megapixels, more than the 100 allowed"):
        read_image(big, max_pixels=100_000_000)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="mosquitto is not installed")
def test_a_daemon_refuses_a_huge_image_and_goes_on_measuring(data_root: Path, tmp_path: Path) -> None:
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))
    broker = Broker(tmp_path)
    broker.start()
    config, incoming = folder_device(tmp_path, broker, "big-1", frames[:1], pattern="*")
    sub = Subscriber(broker.host, broker.port, "cellseg/big-1/#")
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen([sys.executable, "-m", "cellseg", "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    try:
        measured = lambda: [json.loads(p)["image"] for p in sub.payloads("cellseg/big-1/measurement")]  # noqa: E731
        assert sub.wait_for(lambda: len(measured()) == 1, timeout=60)
        before = _peak_rss_mb(daemon.pid)
        huge_png(tmp_path / "huge.png", 20000, 20000).rename(incoming / "huge.png")
        time.sleep(3.0)  # settled and refused
        shutil.copy(frames[1], incoming)
        assert sub.wait_for(lambda: len(measured()) == 2, timeout=60)
        grew = _peak_rss_mb(daemon.pid) - before
        assert [Path(p).name for p in measured()] == [frames[0].name, frames[1].name]
        assert grew < 200, f"peak memory grew by {grew:.0f} MB: the image was decoded"  # decoding alone is 400 MB
        assert daemon.poll() is None
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        log.close()
        sub.close()
        broker.stop()
    assert "huge.png: 20000x20000 is 400 megapixels, more than the 100 allowed" in (tmp_path / "daemon.log").read_text()
