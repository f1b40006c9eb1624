"""Frame -> engine input: 16-to-8-bit mapping, letterbox, BGR->RGB, [0, 1] scaling, HWC->CHW.

This is the numpy/OpenCV reference; the CUDA preprocess kernel implements the same semantics.
The letterbox follows the convention YOLO models are trained with: scale to fit, centre, pad
with grey 114, split odd padding so the extra pixel goes to the bottom/right.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cellseg.edge.pipeline.intensity import IntensityMapping, to_uint8
from cellseg.edge.pipeline.types import Frame, Letterbox

PAD_VALUE = 114


def letterbox_geometry(frame_width: int, frame_height: int, input_width: int, input_height: int) -> Letterbox:
    """Scale and padding that fit a frame into the input, preserving its aspect ratio."""
    scale = min(input_width / frame_width, input_height / frame_height)
    resized_w, resized_h = max(round(frame_width * scale), 1), max(round(frame_height * scale), 1)
    dw, dh = (input_width - resized_w) / 2, (input_height - resized_h) / 2
    # round(d - 0.1) puts the odd pixel of padding on the right/bottom side, as in training.
    return Letterbox(
        scale=scale,
        pad_x=round(dw - 0.1),
        pad_y=round(dh - 0.1),
        frame_width=frame_width,
        frame_height=frame_height,
        input_width=input_width,
        input_height=input_height,
    )


def resize_to_fit(image: npt.NDArray[np.uint8], geometry: Letterbox) -> npt.NDArray[np.uint8]:
    """The 8-bit ``(H, W)`` or ``(H, W, C)`` frame resized (bilinear) to the letterbox's content size."""
    import cv2

    g = geometry
    if (g.resized_width, g.resized_height) == (g.frame_width, g.frame_height):
        return image
    return np.asarray(cv2.resize(image, (g.resized_width, g.resized_height), interpolation=cv2.INTER_LINEAR),
                      dtype=np.uint8)  # fmt: skip


class Preprocessor:
    """Turns frames into ``(1, 3, H, W)`` float32 engine input, reusing one input buffer.

    The returned array is a read-only view of the preprocessor's own buffer: it is overwritten
    by the next call. The padding is written once per letterbox geometry (a camera's frames all
    share one) and each frame fills only the content, so a frame costs its own pixels and
    nothing more; read-only, so no consumer can scribble on the padding the next frame reuses.
    """

    def __init__(self, input_width: int, input_height: int, mapping: IntensityMapping | None = None) -> None:
        self.input_width = input_width
        self.input_height = input_height
        self.mapping = mapping or IntensityMapping()
        self._buffer = np.empty((1, 3, input_height, input_width), dtype=np.float32)
        self._view = self._buffer.view()
        self._view.flags.writeable = False
        self._padded_for: Letterbox | None = None

    def __call__(self, frame: Frame) -> tuple[npt.NDArray[np.float32], Letterbox]:
        g = letterbox_geometry(frame.width, frame.height, self.input_width, self.input_height)
        scale = np.float32(1.0 / 255.0)  # multiplied, not divided: the CUDA kernel's rounding exactly
        if g != self._padded_for:
            self._buffer.fill(np.float32(PAD_VALUE) * scale)
            self._padded_for = g
        content = resize_to_fit(to_uint8(frame.pixels, self.mapping), g)
        planes = self._buffer[0, :, g.pad_y : g.pad_y + g.resized_height, g.pad_x : g.pad_x + g.resized_width]
        if content.ndim == 2:
            # Grey: one channel scaled once, copied into R, G and B.
            np.multiply(content, scale, out=planes[0], casting="unsafe")
            planes[1] = planes[0]
            planes[2] = planes[0]
        else:
            for dst, src in enumerate((2, 1, 0)):  # BGR -> RGB
                np.multiply(content[:, :, src], scale, out=planes[dst], casting="unsafe")
        return self._view, g
