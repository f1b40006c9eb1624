"""On a machine with an NVIDIA GPU: the kernels through pycuda against the numpy reference, and
(with TensorRT) an engine built from the shipped model end to end. Skipped elsewhere; the CPU
emulation in test_cuda_kernels.py checks the same kernels' logic everywhere."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.device import DeviceFacts
from cellseg.edge.engines.cuda_kernels import GpuPostprocess, GpuPreprocess
from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
from cellseg.edge.pipeline.postprocess import Postprocessor
from cellseg.edge.pipeline.preprocess import Preprocessor
from cellseg.edge.pipeline.types import Frame

HAS_GPU = importlib.util.find_spec("pycuda") is not None and DeviceFacts.detect().compute_capability is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU with pycuda")]


@pytest.fixture(scope="module")
def runner():  # type: ignore[no-untyped-def]
    import pycuda.autoinit  # noqa: F401 -- a context for this test module

    from cellseg.edge.engines.cuda_kernels import PycudaRunner

    return PycudaRunner()


def test_kernels_on_the_gpu_match_the_reference(data_root: Path, shipped_model: Path, runner) -> None:  # type: ignore[no-untyped-def]
    with OnnxRuntimeEngine(shipped_model) as engine:
        for path in sorted((data_root / "usiigaci" / "val").glob("*/raw.tif")):
            frame = Frame(read_image(path), source=path.name)
            want, lb = Preprocessor(640, 640, engine.info.mapping)(frame)
            out, _ = GpuPreprocess(runner, 640, 640, engine.info.mapping)(frame)
            got = runner.download(out, want.size, np.float32).reshape(want.shape)
            assert np.abs(got - want).max() <= 1 / 255 + 1e-6
            # The FP16-input variant: the same values, rounded to half as numpy (cvt.rn) rounds them.
            out16, _ = GpuPreprocess(runner, 640, 640, engine.info.mapping, dtype=np.float16)(frame)
            half = runner.download(out16, want.size, np.uint16).reshape(want.shape)
            assert np.array_equal(half, got.astype(np.float16).view(np.uint16))
            raw = engine.infer(want)
            ref = Postprocessor(engine.info.thresholds)(raw, lb)
            gpu = GpuPostprocess(runner, engine.info.thresholds)(
                runner.upload(raw.predictions), runner.upload(raw.prototypes), raw.predictions.shape,
                raw.prototypes.shape, lb, want_masks=True,
            )  # fmt: skip
            assert len(gpu.areas_px) == len(ref)
            np.testing.assert_allclose(gpu.boxes, ref.boxes, atol=1e-3)
            assert abs(gpu.covered_pixels - int(ref.union_mask().sum())) <= 2 + 1e-4 * ref.union_mask().sum()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT")
def test_tensorrt_engine_end_to_end(shipped_model: Path, tmp_path: Path) -> None:
    from cellseg.build.engine_build import build_engine, validate_engine

    report = build_engine(shipped_model, tmp_path / "m.engine", "fp16", say=lambda _: None)
    frames = sorted((Path(__file__).parents[2] / "samples").glob("*.png"))
    validation = validate_engine(tmp_path / "m.engine", shipped_model, report, frames)
    assert validation["passed"], validation
