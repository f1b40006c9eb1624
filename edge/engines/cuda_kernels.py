"""Pre- and post-processing with the CUDA kernels in ``kernels/*.cu``: the host side.

The host plans each launch (letterbox geometry, the 16-bit lookup table, candidate windows,
buffer offsets, separable resampling taps) in numpy and hands buffers to a
:class:`KernelRunner`: :class:`PycudaRunner` on a Jetson, or the CPU emulation the tests use,
which compiles the very same ``.cu`` files with g++. Both therefore exercise this planning code
and the kernels' logic; only the runner differs.

What crosses back to the host per frame: the candidate count and their (index, score, class),
the candidates' boxes, per-detection areas, the covered-pixel count, and the cropped masks only
when an overlay needs them. NMS runs on the host over the survivors (a few hundred boxes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from cellseg.edge.engines.kernel_compile import KERNEL_FILES, kernel_names, kernel_source
from cellseg.edge.pipeline.intensity import IntensityMapping, lookup_table
from cellseg.edge.pipeline.model_info import PostprocessConfig
from cellseg.edge.pipeline.postprocess import (
    MAX_NMS_CANDIDATES,
    AxisResampler,
    MaskResampler,
    decode_and_suppress,
    pixel_spans,
    to_frame_boxes,
)
from cellseg.edge.pipeline.preprocess import letterbox_geometry
from cellseg.edge.pipeline.types import Detections, Frame, Letterbox

BLOCK = 256


class KernelRunner(Protocol):
    """Device memory and kernel launches. ``None`` as a pointer argument is a null pointer."""

    def upload(self, array: npt.NDArray[Any]) -> Any: ...

    def zeros(self, count: int, dtype: npt.DTypeLike) -> Any: ...

    def download(self, buffer: Any, count: int, dtype: npt.DTypeLike) -> npt.NDArray[Any]: ...

    def launch(self, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int], *args: Any) -> None: ...


def _blocks(n: int, block: int = BLOCK) -> int:
    return max(1, math.ceil(n / block))


@dataclass(frozen=True)
class AxisTaps:
    """One axis' resampling in the form the kernel reads: for each frame pixel, the first
    prototype cell and ``taps`` weights (zero-padded)."""

    first: npt.NDArray[np.int32]
    weights: npt.NDArray[np.float32]

    @classmethod
    def from_resampler(cls, axis: AxisResampler) -> AxisTaps:
        span = axis.stop - axis.first
        taps = int(span.max())
        weights = np.zeros((axis.weights.shape[0], taps), dtype=np.float32)
        for i, (a, b) in enumerate(zip(axis.first.tolist(), axis.stop.tolist(), strict=True)):
            weights[i, : b - a] = axis.weights[i, a:b]
        return cls(axis.first.astype(np.int32), weights)

    @property
    def taps(self) -> int:
        return int(self.weights.shape[1])


class GpuPreprocess:
    """Frame -> device input tensor ``(1, 3, H, W)``, float32 or float16 (an engine built with an
    FP16 input), one kernel launch."""

    def __init__(
        self,
        runner: KernelRunner,
        input_width: int,
        input_height: int,
        mapping: IntensityMapping,
        *,
        output: Any = None,
        dtype: npt.DTypeLike = np.float32,
    ) -> None:
        self.runner = runner
        self.input_width, self.input_height = input_width, input_height
        self.mapping = mapping
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise ValueError(f"the preprocess kernel writes float32 or float16 input, not {self.dtype}")
        # The engine's own input buffer when given (no device-to-device copy), else one of ours;
        # float16 is written as its bits, into the kernel's unsigned short output.
        buffer_dtype = np.float32 if self.dtype == np.float32 else np.uint16
        self.output = output if output is not None else runner.zeros(3 * input_width * input_height, buffer_dtype)

    def __call__(self, frame: Frame) -> tuple[Any, Letterbox]:
        pixels = frame.pixels
        if pixels.ndim == 3 and pixels.shape[2] not in (1, 3):
            raise ValueError(f"frames must have 1 or 3 channels, got {pixels.shape[2]}")
        channels = 1 if pixels.ndim == 2 else pixels.shape[2]
        g = letterbox_geometry(frame.width, frame.height, self.input_width, self.input_height)
        pixels = np.ascontiguousarray(pixels)
        if pixels.dtype == np.uint16:
            img8, img16, lut = None, self.runner.upload(pixels), self.runner.upload(lookup_table(pixels, self.mapping))
        else:
            img8, img16, lut = self.runner.upload(pixels), None, None
        grid = (_blocks(self.input_width, 16), _blocks(self.input_height, 16), 1)
        out, out_half = (self.output, None) if self.dtype == np.float32 else (None, self.output)
        self.runner.launch(
            "letterbox", grid, (16, 16, 1), img8, img16, lut, frame.width, frame.height, channels,
            g.resized_width, g.resized_height, g.pad_x, g.pad_y, self.input_width, self.input_height, out, out_half,
        )  # fmt: skip
        return self.output, g


class GpuPostprocess:
    """Raw outputs already on the device -> :class:`~cellseg.edge.pipeline.types.Detections`
    (areas and coverage counted on the GPU; the masks copied back only when asked for), same semantics as
    :func:`cellseg.edge.pipeline.postprocess.postprocess`."""

    def __init__(self, runner: KernelRunner, config: PostprocessConfig) -> None:
        self.runner = runner
        self.config = config
        self._key: tuple[Letterbox, int, int] | None = None
        self._taps: tuple[Any, Any, Any, Any, int, MaskResampler] | None = None
        self._candidates: tuple[int, Any, Any, Any] | None = None

    def _geometry(self, letterbox: Letterbox, ph: int, pw: int) -> tuple[Any, Any, Any, Any, int, MaskResampler]:
        key = (letterbox, ph, pw)
        if self._taps is None or key != self._key:
            resampler = MaskResampler.build(letterbox, ph, pw)
            x, y = AxisTaps.from_resampler(resampler.x), AxisTaps.from_resampler(resampler.y)
            taps = max(x.taps, y.taps)
            xw = np.zeros((x.weights.shape[0], taps), np.float32)
            yw = np.zeros((y.weights.shape[0], taps), np.float32)
            xw[:, : x.taps], yw[:, : y.taps] = x.weights, y.weights
            r = self.runner
            self._taps = (r.upload(x.first), r.upload(xw), r.upload(y.first), r.upload(yw), taps, resampler)
            self._key = key
        return self._taps

    def _candidate_buffers(self, anchors: int) -> tuple[int, Any, Any, Any]:
        if self._candidates is None or self._candidates[0] != anchors:
            r = self.runner
            self._candidates = (anchors, r.zeros(anchors, np.int32), r.zeros(anchors, np.float32),
                                r.zeros(anchors, np.int32))  # fmt: skip
        return self._candidates

    def __call__(
        self,
        predictions: Any,
        prototypes: Any,
        pred_shape: tuple[int, int],
        proto_shape: tuple[int, int, int],
        letterbox: Letterbox,
        *,
        want_masks: bool = False,
    ) -> Detections:
        lb = letterbox
        rows, anchors = pred_shape
        nm = proto_shape[0]
        nc = rows - 4 - nm
        found = self._over_threshold(predictions, anchors, nc)
        if found is None:
            return self._empty(lb, want_masks)
        idx, sc, cl = found
        boxes, kept = decode_and_suppress(self._gather(predictions, anchors, 0, 4, idx), sc, cl, self.config)
        frame_boxes = to_frame_boxes(boxes, lb)
        spans = pixel_spans(frame_boxes, lb)
        keep = np.flatnonzero((spans[:, 1] > spans[:, 0]) & (spans[:, 3] > spans[:, 2]))
        if keep.size == 0:
            return self._empty(lb, want_masks)
        box_px = spans[keep]  # c0, c1, r0, r1
        coefs = self.runner.zeros(int(keep.size) * nm, np.float32)
        self.runner.launch("gather_columns", (_blocks(int(keep.size) * nm), 1, 1), (BLOCK, 1, 1), predictions,
                           anchors, 4 + nc, nm, self.runner.upload(idx[kept][keep].astype(np.int32)), int(keep.size),
                           coefs)  # fmt: skip
        area, covered, masks = self._masks(prototypes, proto_shape, coefs, box_px, lb=lb, want_masks=want_masks)
        # A detection without a single mask pixel is not a cell (as in the reference).
        alive = np.flatnonzero(area > 0)
        sel = keep[alive]
        return Detections(
            boxes=frame_boxes[sel].astype(np.float32),
            scores=sc[kept][sel].astype(np.float32),
            class_ids=cl[kept][sel].astype(np.int32),
            areas_px=area[alive],
            covered_pixels=covered,
            mask_origins=box_px[alive][:, [0, 2]].astype(np.int32),
            masks=None if masks is None else [masks[j] for j in alive.tolist()],
            frame_width=lb.frame_width,
            frame_height=lb.frame_height,
        )

    def _over_threshold(self, predictions: Any, anchors: int, nc: int) -> tuple[Any, Any, Any] | None:
        """Anchors over the confidence threshold: (anchor indices, scores, classes) in anchor
        order, at most MAX_NMS_CANDIDATES of the best; None when there are none."""
        r = self.runner
        _, index, score, klass = self._candidate_buffers(anchors)
        count = r.zeros(1, np.int32)  # zeroed for every frame
        r.launch("filter_candidates", (_blocks(anchors), 1, 1), (BLOCK, 1, 1), predictions, anchors, nc,
                 np.float32(self.config.conf), anchors, count, index, score, klass)  # fmt: skip
        n = int(r.download(count, 1, np.int32)[0])
        if n == 0:
            return None
        idx = r.download(index, n, np.int32)
        sc = r.download(score, n, np.float32)
        cl = r.download(klass, n, np.int32)
        # The reference takes candidates in anchor order (then sorts stably by score in NMS):
        # atomics scattered them, so restore that order for identical tie-breaking.
        order = np.argsort(idx, kind="stable")
        idx, sc, cl = idx[order], sc[order], cl[order]
        if n > MAX_NMS_CANDIDATES:
            best = np.sort(np.argsort(-sc, kind="stable")[:MAX_NMS_CANDIDATES])
            idx, sc, cl = idx[best], sc[best], cl[best]
        return idx, sc, cl

    def _masks(
        self,
        prototypes: Any,
        proto_shape: tuple[int, int, int],
        coefs: Any,
        box_px: npt.NDArray[Any],
        *,
        lb: Letterbox,
        want_masks: bool,
    ) -> tuple[npt.NDArray[np.int64], int, list[npt.NDArray[np.bool_]] | None]:
        """Each kept cell's mask, cropped to its box (``box_px``: c0, c1, r0, r1 in frame pixels):
        its area, the pixels their union covers, and the masks themselves when asked for."""
        r, (nm, ph, pw) = self.runner, proto_shape
        x_first, x_w, y_first, y_w, taps, resampler = self._geometry(lb, ph, pw)
        k = int(box_px.shape[0])
        px0, px1 = resampler.x.windows(box_px[:, 0], box_px[:, 1])
        py0, py1 = resampler.y.windows(box_px[:, 2], box_px[:, 3])
        windows = np.stack([px0, px1, py0, py1], axis=1)
        offsets = np.concatenate([[0], np.cumsum((px1 - px0) * (py1 - py0))])
        mask_sizes = (box_px[:, 1] - box_px[:, 0]) * (box_px[:, 3] - box_px[:, 2])
        mask_offsets = np.concatenate([[0], np.cumsum(mask_sizes)])
        win_dev = r.upload(windows.astype(np.int32).ravel())
        off_dev = r.upload(offsets[:-1].astype(np.int32))
        logits = r.zeros(int(offsets[-1]), np.float32)
        widest = int((px1 - px0).max() * (py1 - py0).max())
        r.launch("proto_logits", (_blocks(widest), k, 1), (BLOCK, 1, 1), prototypes, nm, ph, pw, coefs, win_dev,
                 off_dev, logits)  # fmt: skip
        masks = r.zeros(int(mask_offsets[-1]), np.uint8)
        union = r.zeros(lb.frame_width * lb.frame_height, np.uint8)
        areas = r.zeros(k, np.int32)
        logit_threshold = math.log(self.config.mask_threshold / (1.0 - self.config.mask_threshold))
        r.launch("assemble_masks", (_blocks(int(mask_sizes.max())), k, 1), (BLOCK, 1, 1), logits, win_dev, off_dev,
                 r.upload(box_px.astype(np.int32).ravel()), r.upload(mask_offsets[:-1].astype(np.int32)),
                 x_first, x_w, y_first, y_w, taps, np.float32(logit_threshold), lb.frame_width, masks, union,
                 areas)  # fmt: skip
        total = r.zeros(1, np.uint32)
        n_px = lb.frame_width * lb.frame_height
        r.launch("count_union", (min(_blocks(n_px), 1024), 1, 1), (BLOCK, 1, 1), union, n_px, total)
        area = r.download(areas, k, np.int32).astype(np.int64)
        covered = int(r.download(total, 1, np.uint32)[0])
        if not want_masks:
            return area, covered, None
        flat = r.download(masks, int(mask_offsets[-1]), np.uint8).astype(bool)
        cropped = []
        for j in range(k):
            c0, c1, r0, r1 = box_px[j].tolist()
            cropped.append(flat[mask_offsets[j] : mask_offsets[j + 1]].reshape(r1 - r0, c1 - c0))
        return area, covered, cropped

    @staticmethod
    def _empty(lb: Letterbox, want_masks: bool) -> Detections:
        return Detections.empty(lb.frame_width, lb.frame_height, with_masks=want_masks)

    def _gather(self, predictions: Any, anchors: int, row0: int, rows: int, idx: npt.NDArray[Any]) -> Any:
        r = self.runner
        n = len(idx)
        out = r.zeros(n * rows, np.float32)
        r.launch("gather_columns", (_blocks(n * rows), 1, 1), (BLOCK, 1, 1), predictions, anchors, row0, rows,
                 r.upload(idx.astype(np.int32)), n, out)  # fmt: skip
        return r.download(out, n * rows, np.float32).reshape(n, rows)


class PycudaRunner:
    """Runs the kernels on the GPU, from cubins NVRTC compiled for this GPU
    (:mod:`cellseg.edge.engines.kernel_compile`), or, given none, compiled here by pycuda with nvcc.

    Call with the engine's CUDA context current (``engine.active()``).
    """

    def __init__(self, cubins: Mapping[str, bytes] | None = None) -> None:
        import pycuda.driver as cuda

        self._cuda = cuda
        self._functions = {}
        for name in KERNEL_FILES:
            if cubins is not None:
                module = cuda.module_from_buffer(cubins[name])
            else:
                from pycuda.compiler import SourceModule

                module = SourceModule(kernel_source(name))  # runs nvcc, which must be on the PATH
            for kernel in kernel_names(kernel_source(name)):
                self._functions[kernel] = module.get_function(kernel)

    def upload(self, array: npt.NDArray[Any]) -> Any:
        return self._cuda.to_device(np.ascontiguousarray(array))

    def zeros(self, count: int, dtype: npt.DTypeLike) -> Any:
        nbytes = max(count * np.dtype(dtype).itemsize, 1)
        buf = self._cuda.mem_alloc(nbytes)
        self._cuda.memset_d8(buf, 0, nbytes)
        return buf

    def download(self, buffer: Any, count: int, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        out = np.empty(count, dtype=dtype)
        if count:
            self._cuda.memcpy_dtoh(out, buffer)
        return out

    def launch(self, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int], *args: Any) -> None:
        converted = [np.intp(0) if a is None else np.int32(a) if isinstance(a, int) else a for a in args]
        self._functions[kernel](*converted, block=block, grid=grid[:2])
