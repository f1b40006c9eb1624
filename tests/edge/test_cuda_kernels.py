"""The CUDA kernels' logic, run on the CPU: the same .cu sources compiled with g++ through the
emulation header and driven by the same host code as on a Jetson (GpuPreprocess/GpuPostprocess),
compared with the numpy reference on real frames from ../shared/data."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.engines.cuda_kernels import GpuPostprocess, GpuPreprocess
from cellseg.edge.engines.kernel_compile import KERNEL_DIR, KERNEL_FILES, kernel_source
from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
from cellseg.edge.pipeline.postprocess import Postprocessor
from cellseg.edge.pipeline.preprocess import Preprocessor
from cellseg.edge.pipeline.types import Detections, Frame
from tests.conftest import SAMPLES
from tests.edge.cuda_emu import EmulatedRunner, build_library

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to run the kernels on the CPU")


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> EmulatedRunner:
    lib, signatures = build_library(tmp_path_factory.mktemp("kernels"))
    return EmulatedRunner(lib, signatures)


@pytest.fixture(scope="module")
def engine(shipped_model: Path):  # type: ignore[no-untyped-def]
    with OnnxRuntimeEngine(shipped_model, threads=2) as e:
        yield e


def _frames(data_root: Path) -> dict[str, np.ndarray]:
    raw16 = read_image(data_root / "usiigaci" / "val" / "set46" / "raw.tif")
    t98g = read_image(sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[5])
    png8 = read_image(sorted(SAMPLES.glob("*.png"))[1])
    grey8 = png8 if png8.ndim == 2 else cv2.cvtColor(png8, cv2.COLOR_BGR2GRAY)
    return {
        "usiigaci 16-bit 1024x1022": raw16,
        "t98g 16-bit": t98g,
        "8-bit PNG": png8,
        "odd 16-bit crop 517x333": raw16[101:434, 37:554],
        "small 8-bit crop 300x200 (upscaled)": grey8[500:700, 600:900],
        "exact 640x640 (no resize)": grey8[:640, :640],
        # A colour camera's frame: three different channels, so a swapped B and R shows.
        "colour BGR 8-bit": np.dstack([grey8, (grey8 * 0.85).astype(np.uint8), (grey8 * 0.7).astype(np.uint8)]),
        "cells cut by the frame edge": raw16[400:700, 0:450],
    }


def test_preprocess_kernel_matches_the_reference(data_root: Path, runner: EmulatedRunner, engine) -> None:  # type: ignore[no-untyped-def]
    gpu = GpuPreprocess(runner, 640, 640, engine.info.mapping)
    ref = Preprocessor(640, 640, engine.info.mapping)
    for name, pixels in _frames(data_root).items():
        frame = Frame(pixels, source=name)
        want, geometry = ref(frame)
        out, g2 = gpu(frame)
        got = out.reshape(want.shape)
        assert g2 == geometry, name
        diff = np.abs(got - want)
        # OpenCV resizes 8-bit images in fixed point; the kernel rounds a float bilinear value to a
        # whole level: at most one level apart, and mostly identical.
        assert diff.max() <= 1 / 255 + 1e-6, (name, diff.max() * 255)
        assert (diff < 1e-6).mean() > 0.8, name
        pad = np.ones(want.shape[2:], bool)
        pad[geometry.pad_y : geometry.pad_y + geometry.resized_height,
            geometry.pad_x : geometry.pad_x + geometry.resized_width] = False  # fmt: skip
        assert np.array_equal(got[0][:, pad], want[0][:, pad]), name  # padding exact
        if geometry.resized_width == frame.width and geometry.resized_height == frame.height:
            assert np.array_equal(got, want), name  # no resize: bit for bit


def _compare(want: Detections, got_runner: EmulatedRunner, raw, lb, config) -> int:  # type: ignore[no-untyped-def]
    gpu = GpuPostprocess(got_runner, config)
    got = gpu(got_runner.upload(raw.predictions), got_runner.upload(raw.prototypes), raw.predictions.shape,
              raw.prototypes.shape, lb, want_masks=True)  # fmt: skip
    assert len(got.areas_px) == len(want)
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-4)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert np.array_equal(got.mask_origins, want.mask_origins)
    assert got.masks is not None
    total = sum(m.size for m in want.masks)
    mismatched = sum(int((a != b).sum()) for a, b in zip(want.masks, got.masks, strict=True))
    # Float sums in another order may flip a pixel whose logit sits on the threshold.
    assert mismatched <= 1e-4 * total + 2, (mismatched, total)
    assert len(want) == 0 or np.abs(got.areas_px - want.areas_px).max() <= 2
    union = int(want.union_mask().sum()) if len(want) else 0
    assert abs(got.covered_pixels - union) <= 2 + 1e-4 * union
    return len(want)


def test_postprocess_kernels_match_the_reference(data_root: Path, runner: EmulatedRunner, engine) -> None:  # type: ignore[no-untyped-def]
    pre = Preprocessor(640, 640, engine.info.mapping)
    config = engine.info.thresholds
    counts = {}
    for name, pixels in _frames(data_root).items():
        tensor, lb = pre(Frame(pixels, source=name))
        raw = engine.infer(tensor)
        want = Postprocessor(config)(raw, lb)
        counts[name] = _compare(want, runner, raw, lb, config)
        if name == "cells cut by the frame edge":
            touching = [
                x == 0 or y == 0 or x + m.shape[1] == want.frame_width or y + m.shape[0] == want.frame_height
                for (x, y), m in zip(want.mask_origins.tolist(), want.masks, strict=True)
            ]
            assert sum(touching) >= 3  # masks that run into the frame's edge
    assert all(c > 0 for c in counts.values()), counts


def test_postprocess_kernels_with_500_detections_and_with_none(data_root: Path, runner: EmulatedRunner, engine) -> None:  # type: ignore[no-untyped-def]
    pre = Preprocessor(640, 640, engine.info.mapping)
    raw16 = read_image(data_root / "usiigaci" / "val" / "set48" / "raw.tif")
    tensor, lb = pre(Frame(raw16, source="set48"))
    raw = engine.infer(tensor)
    dense = engine.info.thresholds.overridden(conf=0.01, iou=0.9, max_det=3000)
    assert _compare(Postprocessor(dense)(raw, lb), runner, raw, lb, dense) >= 500
    # A blank field (no cells under the objective): nothing found, nothing covered.
    blank = np.full_like(raw16, int(np.median(raw16)))
    tensor, lb = pre(Frame(blank, source="blank"))
    raw = engine.infer(tensor)
    assert _compare(Postprocessor(engine.info.thresholds)(raw, lb), runner, raw, lb, engine.info.thresholds) == 0


def test_preprocess_kernel_writes_an_fp16_input(data_root: Path, runner: EmulatedRunner, engine) -> None:  # type: ignore[no-untyped-def]
    """For an engine with an FP16 input: the same values as the float32 kernel, rounded to half
    exactly as numpy rounds them."""
    single = GpuPreprocess(runner, 640, 640, engine.info.mapping)
    half = GpuPreprocess(runner, 640, 640, engine.info.mapping, dtype=np.float16)
    for name, pixels in _frames(data_root).items():
        frame = Frame(pixels, source=name)
        want = single(frame)[0].astype(np.float16).view(np.uint16)
        got = half(frame)[0]
        assert got.dtype == np.uint16 and got.shape == want.shape, name
        assert np.array_equal(got, want), name
    with pytest.raises(ValueError, match="float32 or float16"):
        GpuPreprocess(runner, 640, 640, engine.info.mapping, dtype=np.int8)


def test_half_rounding_matches_ieee_on_every_kind_of_float(tmp_path: Path) -> None:
    """The kernel's float -> half conversion against numpy's, over the cases that break naive
    conversions: ties to even, subnormal halves, the overflow edge, infinities, NaN, signed zero."""
    src = tmp_path / "half.cpp"
    src.write_text(
        f'#include "emulate.h"\n#include "{KERNEL_DIR / "preprocess.cu"}"\n'
        'extern "C" void convert(const float* in, int n, unsigned short* out)'
        " { for (int i = 0; i < n; ++i) out[i] = half_bits(in[i]); }\n"
    )
    lib_path = tmp_path / "half.so"
    here = Path(__file__).parent / "cuda_emu"
    subprocess.run(["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unused-function",
                    f"-I{here}", "-o", str(lib_path), str(src)], check=True)  # fmt: skip
    lib = ctypes.CDLL(str(lib_path))
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 1.0, 1 / 255, 114 / 255, 65504.0, 65519.99, 65520.0, 1e9, np.inf, -np.inf,
                        2.0**-14, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-26, 6e-8, 1e-40, 3.0**-20],
                       dtype=np.float32)  # fmt: skip
    # Every half's exact value, and the midpoints between neighbouring halves (the ties), +-1 ulp.
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)
    near = np.concatenate([mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf)])
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.ascontiguousarray(np.concatenate([special, halves, near, -near, random_bits]), dtype=np.float32)
    out = np.zeros(values.size, dtype=np.uint16)
    lib.convert(values.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(values.size), out.ctypes.data_as(ctypes.c_void_p))
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    nan = np.isnan(values)
    assert np.isnan(out[nan].view(np.float16)).all()
    np.testing.assert_array_equal(out[~nan], want[~nan].view(np.uint16))


def test_atomics_hold_under_threaded_emulation(data_root: Path, runner: EmulatedRunner, engine) -> None:  # type: ignore[no-untyped-def]
    """The candidate filter's atomic counter, with every CUDA thread a real thread."""
    threaded = EmulatedRunner(runner.lib, runner.signatures, threaded=True)
    tensor, _ = Preprocessor(640, 640, engine.info.mapping)(Frame(read_image(sorted(SAMPLES.glob("*.png"))[0]),
                                                                   source="s"))  # fmt: skip
    raw = engine.infer(tensor)
    config = engine.info.thresholds.overridden(conf=0.05)
    preds = threaded.upload(raw.predictions)
    count, index = threaded.zeros(1, np.int32), threaded.zeros(8400, np.int32)
    score, klass = threaded.zeros(8400, np.float32), threaded.zeros(8400, np.int32)
    threaded.launch("filter_candidates", (33, 1, 1), (256, 1, 1), preds, 8400, 1, np.float32(config.conf), 8400,
                    count, index, score, klass)  # fmt: skip
    expected = np.flatnonzero(raw.predictions[4] > config.conf)
    assert int(count[0]) == expected.size > 100
    assert np.array_equal(np.sort(index[: expected.size]), expected)


def test_syncthreads_needs_the_threaded_mode_and_is_never_skipped(tmp_path: Path) -> None:
    src = tmp_path / "sync.cpp"
    src.write_text(
        '#include "emulate.h"\n'
        "__global__ void k(int* out) { __shared__ int s[4]; s[threadIdx.x] = threadIdx.x + 1; __syncthreads();"
        " out[threadIdx.x] = s[(threadIdx.x + 1) % 4]; }\n"
        "int main(int argc, char**) { int out[4] = {0}; emu::threaded = argc > 1;"
        " emu::launch(dim3(1), dim3(4), [&] { k(out); }); return out[0] == 2 && out[3] == 1 ? 0 : 3; }\n"
    )
    exe = tmp_path / "sync"
    here = Path(__file__).parent / "cuda_emu"
    subprocess.run(["g++", "-std=c++20", "-pthread", f"-I{here}", "-o", str(exe), str(src)], check=True)
    assert subprocess.run([str(exe), "threaded"], check=False).returncode == 0
    serial = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    assert serial.returncode != 0 and "threaded emulation mode" in serial.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_kernels_compile_for_jetson_orin_sm87(tmp_path: Path) -> None:
    for name in KERNEL_FILES:
        # pycuda wraps the source in extern "C" { ... } before compiling; do the same.
        cu = tmp_path / f"{name}.cu"
        cu.write_text('extern "C" {\n' + kernel_source(name) + "\n}\n")
        done = subprocess.run(["nvcc", "-arch=sm_87", "-cubin", "-o", str(tmp_path / f"{name}.cubin"), str(cu)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"{name}.cubin").stat().st_size > 1000
    assert sorted(p.stem for p in KERNEL_DIR.glob("*.cu")) == sorted(KERNEL_FILES)
