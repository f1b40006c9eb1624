"""Which frames show the same field of view, so that cross-validation never puts one field on both
sides of a fold.

Frames of one field taken minutes apart share most of their cells; a model that saw one of them in
training has half seen the other, and a fold that straddles them reports an accuracy no new culture
will get. Two ways to know the fields:

- a regular expression on the file name whose ``field`` group (or whole match) names the field,
  when the acquisition software writes it (``xy01`` in ``20180101ef002xy01t05.tif``);
- otherwise, from the pixels: two frames are the same field when, registered onto each other by
  phase correlation, their fine structure (the frame minus its blur, so illumination does not count)
  correlates above :data:`SAME_FIELD_CORRELATION`. Fields are the connected groups of that relation.

The threshold comes from real frames (the T98G time-lapse and the 45 Usiigaci sets, 512 px
signatures): consecutive time-lapse frames 10 minutes apart correlate at 0.43-0.64, the same field
1.8 hours apart still at 0.07; the 990 pairs of Usiigaci sets at most 0.032 (99th percentile
0.025), so no two of those sets are one field. 0.1 joins a time-lapse through its consecutive
frames with a margin of four, and stays three times above any unrelated pair.

Phase correlation is done here with numpy's FFT, not ``cv2.phaseCorrelate``: OpenCV 5.0 writes
the window into its input arrays, so a second call on the same arrays answers differently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.errors import ConfigError

SAME_FIELD_CORRELATION = 0.1
SIGNATURE_PX = 512
_BLUR_SIGMA = 8.0  # px at the signature's scale: removes illumination, keeps cells and debris
_MARGIN = 40  # px left out at the borders, where the shifted frame wraps round


def signature(pixels: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    """A frame's fine structure at a fixed size, zero mean and unit variance."""
    import cv2

    grey = pixels if pixels.ndim == 2 else pixels[..., 0]
    small = cv2.resize(grey.astype(np.float32), (SIGNATURE_PX, SIGNATURE_PX), interpolation=cv2.INTER_AREA)
    fine = small - cv2.GaussianBlur(small, (0, 0), _BLUR_SIGMA)
    spread = float(fine.std())
    return ((fine - fine.mean()) / spread if spread > 0 else fine * 0).astype(np.float32)


@dataclass(frozen=True)
class Signature:
    """A frame's fine structure and its windowed spectrum (computed once, compared with every frame)."""

    fine: npt.NDArray[np.float32]
    spectrum: npt.NDArray[np.complex128]

    @classmethod
    def of(cls, pixels: npt.NDArray[np.generic]) -> Signature:
        fine = signature(pixels)
        window = np.outer(np.hanning(fine.shape[0]), np.hanning(fine.shape[1]))
        return cls(fine, np.fft.rfft2(fine * window))


def same_field_score(a: Signature, b: Signature) -> float:
    """Correlation of two frames' fine structure after shifting ``b`` onto ``a`` (0 for a flat frame)."""
    cross = a.spectrum * np.conj(b.spectrum)
    surface = np.fft.irfft2(cross / (np.abs(cross) + 1e-12), s=a.fine.shape)
    # The peak of the phase correlation is the shift d with a(x) ~ b(x - d); shifts past half the
    # frame wrap round to negative ones.
    dy, dx = np.unravel_index(int(np.argmax(surface)), surface.shape)
    shifted = np.roll(b.fine, (int(dy), int(dx)), axis=(0, 1))
    m = _MARGIN
    x, y = a.fine[m:-m, m:-m].ravel(), shifted[m:-m, m:-m].ravel()
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def groups_by_name(images: Sequence[Path], pattern: str) -> list[int]:
    """Field ids from a regular expression on the file name (its ``field`` group, else the match)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"field pattern {pattern!r} is not a regular expression: {e}") from e
    ids: dict[str, int] = {}
    out = []
    for image in images:
        found = rx.search(image.name)
        if found is None:
            raise ConfigError(f"field pattern {pattern!r} does not match {image.name}, so its field is unknown")
        key = found.group("field") if "field" in rx.groupindex else found.group(0)
        out.append(ids.setdefault(key, len(ids)))
    return out


def groups_by_pixels(
    images: Sequence[Path], *, threshold: float = SAME_FIELD_CORRELATION, progress: bool = True
) -> list[int]:
    """Field ids from the frames' content: connected groups of same-field pairs (every pair is compared)."""
    signatures = [Signature.of(read_image(p)) for p in tqdm(images, desc="field signatures", disable=not progress)]
    parent = list(range(len(images)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = [(i, j) for i in range(len(images)) for j in range(i + 1, len(images))]
    for i, j in tqdm(pairs, desc="same-field pairs", disable=not progress):
        if root(i) != root(j) and same_field_score(signatures[i], signatures[j]) > threshold:
            parent[root(j)] = root(i)
    roots: dict[int, int] = {}
    return [roots.setdefault(root(i), len(roots)) for i in range(len(images))]


def field_groups(images: Sequence[Path], *, pattern: str | None = None, progress: bool = True) -> list[int]:
    """One field id per image, 0-based, numbered in order of first appearance."""
    return groups_by_name(images, pattern) if pattern else groups_by_pixels(images, progress=progress)
