"""Reading microscope frames from files: 8- and 16-bit TIFF, PNG and JPEG, grey or colour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.errors import DependencyError, ImageReadError

IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"})


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise DependencyError("opencv-python", "cpu", "reading images") from e
    # Microscope TIFFs carry vendor tags OpenCV warns about on every read; errors still show.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    return cv2


def read_image(path: str | Path) -> npt.NDArray[Any]:
    """Read an image file with its native bit depth.

    Returns:
        ``(H, W)`` grey or ``(H, W, 3)`` BGR array, dtype uint8 or uint16. An alpha channel is
        dropped; a multi-page TIFF gives its first page.

    Raises:
        ImageReadError: the file is missing, empty, corrupt or of an unsupported pixel type.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty")
    cv2 = _cv2()
    # IMREAD_UNCHANGED keeps 16-bit data; ANYCOLOR alone would scale it down to 8 bits.
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None and path.suffix.lower() in {".tif", ".tiff"}:
        image = _read_tiff(path)
    if image is None:
        raise ImageReadError(path, "not a readable image (corrupt, truncated or unsupported format)")
    return normalise_layout(image, path)


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
