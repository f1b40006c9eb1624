from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.errors import ConfigError, FrameError
from cellseg.edge.pipeline.intensity import (
    IntensityMapping,
    lookup_table,
    sample_stride,
    stretch,
    stretch_limits,
    to_uint8,
)


@pytest.fixture(scope="module")
def frame16(usiigaci: Path) -> np.ndarray:
    image = read_image(usiigaci / "val" / "set46" / "raw.tif")
    assert image.dtype == np.uint16
    return image


def test_real_16bit_frame_is_stretched_to_the_full_8bit_range(frame16: np.ndarray) -> None:
    out = to_uint8(frame16)
    assert out.dtype == np.uint8 and out.shape == frame16.shape
    # 0.5 % of pixels at or below the low percentile, 0.5 % at or above the high one.
    assert 0.002 < np.mean(out == 0) < 0.02
    assert 0.002 < np.mean(out == 255) < 0.02
    assert 60 < out.mean() < 170  # phase contrast: a grey background, neither black nor white


def test_mapping_is_a_monotonic_function_of_intensity(frame16: np.ndarray) -> None:
    out = to_uint8(frame16)
    order = np.argsort(frame16.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)


def test_12bit_data_maps_like_the_same_scene_in_16_bits(frame16: np.ndarray) -> None:
    twelve = (frame16 >> 4).astype(np.uint16)
    back = (twelve << 4).astype(np.uint16)
    # Same scene, 16x fewer levels: identical up to the quantisation of the 12-bit copy.
    diff = np.abs(to_uint8(twelve).astype(int) - to_uint8(back).astype(int))
    assert diff.max() <= 1


def test_uint8_passes_through_unchanged() -> None:
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert to_uint8(image) is image


def test_flat_frame_becomes_mid_grey_not_nan() -> None:
    out = to_uint8(np.full((64, 64), 1234, dtype=np.uint16))
    assert np.all(out == 128)


def test_limits_come_from_a_bounded_strided_sample() -> None:
    assert sample_stride(1022, 1024, 65536) == 4
    assert sample_stride(100, 100, 65536) == 1
    image = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100)
    low, high = stretch_limits(image, IntensityMapping(low_pct=0.0, high_pct=100.0))
    assert (low, high) == (0.0, 9999.0)


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint32])
def test_unsupported_pixel_types_are_refused(dtype: type) -> None:
    with pytest.raises(FrameError, match="uint8 or uint16"):
        to_uint8(np.zeros((8, 8), dtype=dtype))


@pytest.mark.parametrize(
    "kwargs", [{"low_pct": 50, "high_pct": 40}, {"low_pct": -1}, {"high_pct": 101}, {"max_samples": 10}]
)
def test_bad_mapping_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        IntensityMapping(**kwargs)  # type: ignore[arg-type]


def test_histogram_limits_equal_numpy_percentile(frame16: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    cases = [frame16, frame16[:7, :5], (frame16 >> 4).astype(np.uint16)]
    cases += [rng.integers(0, 4096, size=(37, 53), dtype=np.uint16) for _ in range(20)]
    for image in cases:
        for low, high in [(0.5, 99.5), (0.0, 100.0), (2.0, 98.0), (33.3, 66.6)]:
            mapping = IntensityMapping(low_pct=low, high_pct=high)
            stride = sample_stride(image.shape[0], image.shape[1], mapping.max_samples)
            expected = np.percentile(image[::stride, ::stride], [low, high])
            np.testing.assert_allclose(stretch_limits(image, mapping), expected, rtol=0, atol=1e-9)


def test_the_lookup_table_reproduces_the_mapping_bit_for_bit(data_root: Path, frame16: np.ndarray) -> None:
    """The CUDA kernel maps through ``lookup_table``, the CPU through OpenCV: the same bytes, on
    real frames, odd crops (row tails), three-channel frames and a 12-bit camera's frames."""
    frames = [read_image(p) for p in sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[:4]]
    frames += [frame16, frame16[3:520, 5:338], (frame16 >> 4).astype(np.uint16)]
    frames.append(np.dstack([frame16, frame16 // 2, frame16 // 3])[:333, :517])
    for image in frames:
        assert image.dtype == np.uint16
        table = lookup_table(image)
        assert table.shape == (65536,) and table.dtype == np.uint8
        np.testing.assert_array_equal(to_uint8(image), table[image])


def test_the_stretch_is_the_percentiles_with_a_whole_level_offset(frame16: np.ndarray) -> None:
    low, high = stretch_limits(frame16, IntensityMapping())
    offset, scale = stretch(frame16, IntensityMapping())
    assert offset == int(low) and scale == pytest.approx(255.0 / (high - offset))
    table = lookup_table(frame16).astype(int)
    levels = np.arange(65536)
    assert (table[levels <= offset] == 0).all() and (table[levels >= high] == 255).all()
    # Between the limits: the affine stretch, rounded to the nearest level.
    inside = (levels > offset) & (levels < high)
    assert np.abs(table[inside] - (levels[inside] - low) * 255.0 / (high - low)).max() <= 0.51
