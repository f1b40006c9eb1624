"""Reading microscope frames from files: 8- and 16-bit TIFF, PNG and JPEG, grey or colour.

A file that arrives from outside (a watched folder) can claim any size: a 20000x20000 PNG of a
few hundred kilobytes decodes to 400 MB and peaked at 1.3 GB in the pipeline, which on a
Jetson that shares its 4-8 GB with the GPU can end the service. ``read_image(max_pixels=...)``
reads the width and height from the file's header (:func:`image_size`: PNG, JPEG, BMP, TIFF and
BigTIFF, a few hundred bytes each) and refuses a larger image before anything is decoded.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.errors import DependencyError, ImageReadError

# cv::utils::logging::LOG_LEVEL_ERROR, as the OpenCV versions without cv2.utils.logging number it.
OPENCV_LOG_LEVEL_ERROR = 2
IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"})


@functools.cache
def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise DependencyError("opencv-python", "cpu", "reading images") from e
    # Microscope TIFFs carry vendor tags OpenCV warns about on every read; errors still show.
    # OpenCV 4.8 (JetPack 6's) has no cv2.utils.logging, only cv2.setLogLevel with the same levels.
    api = getattr(cv2.utils, "logging", None)
    if api is not None:
        api.setLogLevel(api.LOG_LEVEL_ERROR)
    elif hasattr(cv2, "setLogLevel"):
        cv2.setLogLevel(OPENCV_LOG_LEVEL_ERROR)
    return cv2


def read_image(path: str | Path, max_pixels: int | None = None) -> npt.NDArray[Any]:
    """Read an image file with its native bit depth.

    Args:
        max_pixels: refuse, from its header and before decoding, an image with more pixels.

    Returns:
        ``(H, W)`` grey or ``(H, W, 3)`` BGR array, dtype uint8 or uint16. An alpha channel is
        dropped; a multi-page TIFF gives its first page.

    Raises:
        ImageReadError: the file is missing, empty, corrupt, too large or of an unsupported
            pixel type.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty")
    if max_pixels is not None:
        size = image_size(path)
        if size is not None and size[0] * size[1] > max_pixels:
            width, height = size
            raise ImageReadError(
                path,
                f"{width}x{height} is {width * height / 1e6:.0f} megapixels, more than the "
                f"{max_pixels / 1e6:g} allowed (source.max_megapixels); not decoded",
            )
    cv2 = _cv2()
    # IMREAD_UNCHANGED keeps 16-bit data; ANYCOLOR alone would scale it down to 8 bits.
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None and path.suffix.lower() in {".tif", ".tiff"}:
        image = _read_tiff(path)
    if image is None:
        raise ImageReadError(path, "not a readable image (corrupt, truncated or unsupported format)")
    return normalise_layout(image, path)


def image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the header of a PNG, JPEG, BMP or TIFF file; None when the format
    is another one or the header is damaged (the decoder then says what is wrong)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
                width, height = struct.unpack(">II", head[16:24])
                return int(width), int(height)
            if head.startswith(b"BM") and len(head) >= 26:
                width, height = struct.unpack("<ii", head[18:26])
                return abs(int(width)), abs(int(height))
            if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                return _tiff_size(f, head)
            if head.startswith(b"\xff\xd8"):
                return _jpeg_size(f)
    except (OSError, struct.error):
        return None
    return None


def _tiff_size(f: Any, head: bytes) -> tuple[int, int] | None:
    """Width and height tags (256, 257) of the first IFD, classic TIFF or BigTIFF."""
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    if big:
        (offset,) = struct.unpack(order + "Q", head[8:16])
        count_fmt, entry_fmt, entry_size = "Q", "HHQ8s", 20
    else:
        (offset,) = struct.unpack(order + "I", head[4:8])
        count_fmt, entry_fmt, entry_size = "H", "HHI4s", 12
    f.seek(offset)
    (count,) = struct.unpack(order + count_fmt, f.read(struct.calcsize(count_fmt)))
    found: dict[int, int] = {}
    for _ in range(min(count, 4096)):
        tag, kind, _n, value = struct.unpack(order + entry_fmt, f.read(entry_size))
        if tag in (256, 257):  # SHORT (3), LONG (4) or LONG8 (16), stored in the value field
            fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
            if fmt is None:
                return None
            found[tag] = struct.unpack(order + fmt, value[: struct.calcsize(fmt)])[0]
        if len(found) == 2:
            return found[256], found[257]
    return None


def _jpeg_size(f: Any) -> tuple[int, int] | None:
    """The frame header (SOFn) of a JPEG: height and width follow its precision byte."""
    f.seek(2)
    while True:
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        if marker[1] in (0xD8, 0x01) or 0xD0 <= marker[1] <= 0xD7:  # no length follows
            continue
        (length,) = struct.unpack(">H", f.read(2))
        if 0xC0 <= marker[1] <= 0xCF and marker[1] not in (0xC4, 0xC8, 0xCC):
            _precision, height, width = struct.unpack(">BHH", f.read(5))
            return int(width), int(height)
        f.seek(length - 2, 1)


def _read_tiff(path: Path) -> npt.NDArray[Any] | None:
    """TIFF variants OpenCV refuses (some scientific compressions) through tifffile, when present."""
    try:
        import tifffile
    except ImportError:
        return None
    try:
        data = tifffile.imread(str(path), key=0)
    except Exception:  # tifffile raises many unrelated types for corrupt files
        return None
    return np.asarray(data)


def normalise_layout(image: npt.NDArray[Any], source: object = "frame") -> npt.NDArray[Any]:
    """Bring an array to ``(H, W)`` grey or ``(H, W, 3)`` BGR of dtype uint8/uint16."""
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(source, f"unsupported pixel type {image.dtype} (expected 8- or 16-bit integers)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3):
        if image.shape[0] < 2 or image.shape[1] < 2:
            raise ImageReadError(source, f"image is too small: {image.shape}")
        return image
    raise ImageReadError(source, f"unsupported image shape {image.shape} (expected HxW, HxWx3 or HxWx4)")


def to_bgr(image: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``(H, W)`` grey -> ``(H, W, 3)`` by repeating the channel; colour passes through."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image
