from __future__ import annotations

import numpy as np
import pytest

from cellseg.edge.errors import FrameError
from cellseg.edge.pipeline.preprocess import PAD_VALUE, Preprocessor, letterbox_geometry
from cellseg.edge.pipeline.types import Frame


@pytest.mark.parametrize(
    ("frame", "inp", "scale", "resized", "pad"),
    [
        ((1024, 1022), (640, 640), 0.625, (640, 639), (0, 0)),  # the odd row of padding goes to the bottom
        ((7, 3), (640, 640), 640 / 7, (640, 274), (0, 183)),
        ((3, 7), (640, 640), 640 / 7, (274, 640), (183, 0)),
        ((640, 640), (640, 640), 1.0, (640, 640), (0, 0)),
        ((100, 50), (64, 64), 0.64, (64, 32), (0, 16)),
        ((1280, 720), (640, 384), 0.5, (640, 360), (0, 12)),
    ],
)
def test_letterbox_geometry(frame: tuple[int, int], inp: tuple[int, int], scale: float, resized: tuple[int, int],
                            pad: tuple[int, int]) -> None:  # fmt: skip
    g = letterbox_geometry(*frame, *inp)
    assert g.scale == pytest.approx(scale)
    assert (g.resized_width, g.resized_height) == resized
    assert (g.pad_x, g.pad_y) == pad
    assert g.pad_x + g.resized_width <= inp[0] and g.pad_y + g.resized_height <= inp[1]


def test_bgr_becomes_rgb_in_unit_range_with_grey_padding() -> None:
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :, 0] = 255  # blue
    pixels[:, :, 2] = 51  # a little red
    tensor, g = Preprocessor(64, 64)(Frame(pixels))
    assert tensor.shape == (1, 3, 64, 64) and tensor.dtype == np.float32
    assert (g.pad_x, g.pad_y) == (0, 16)
    content = tensor[0, :, 16:48, :]
    np.testing.assert_allclose(content[0], 0.2)  # R
    np.testing.assert_allclose(content[1], 0.0)  # G
    np.testing.assert_allclose(content[2], 1.0)  # B
    np.testing.assert_allclose(tensor[0, :, :16, :], PAD_VALUE / 255, rtol=1e-6)
    np.testing.assert_allclose(tensor[0, :, 48:, :], PAD_VALUE / 255, rtol=1e-6)


def test_padding_is_right_after_the_geometry_changes_and_cannot_be_overwritten() -> None:
    """The padding is written once per geometry: a landscape frame after a portrait one (whose
    content covered the landscape padding) must still get grey padding."""
    rng = np.random.default_rng(2)
    wide, tall = rng.integers(0, 256, (32, 64), np.uint8), rng.integers(0, 256, (64, 20), np.uint8)
    shared = Preprocessor(64, 64)
    for pixels in (wide, tall, wide, tall):
        got, _ = shared(Frame(pixels))
        want, _ = Preprocessor(64, 64)(Frame(pixels))
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="read-only"):
        got[0, 0, 0, 0] = 0.0


def test_grey_frame_fills_all_three_channels() -> None:
    pixels = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    tensor, _ = Preprocessor(64, 64)(Frame(pixels))
    np.testing.assert_array_equal(tensor[0, 0], tensor[0, 1])
    np.testing.assert_array_equal(tensor[0, 0], tensor[0, 2])
    np.testing.assert_allclose(tensor[0, 0, 0], np.arange(64) * 4 / 255, rtol=1e-6)


def test_16bit_frames_are_mapped_like_training() -> None:
    from cellseg.edge.pipeline.intensity import to_uint8

    rng = np.random.default_rng(1)
    pixels = rng.integers(1000, 5000, size=(64, 64), dtype=np.uint16)
    tensor, _ = Preprocessor(64, 64)(Frame(pixels))
    np.testing.assert_allclose(tensor[0, 0], to_uint8(pixels) / 255, rtol=1e-6)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((10, 10), dtype=np.float32), "uint8 or uint16"),
        (np.zeros((10, 10, 4), dtype=np.uint8), r"\(H, W\) or \(H, W, 3\)"),
        (np.zeros((1, 10), dtype=np.uint8), "too small"),
    ],
)
def test_bad_frames_are_refused(pixels: np.ndarray, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        Frame(pixels)
