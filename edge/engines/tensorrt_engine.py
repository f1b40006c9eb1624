"""TensorRT backend (Jetson): a bundle's plan run through pycuda with buffers allocated once.

Supported: TensorRT 8.6 (JetPack 6.0) and 10.x (JetPack 6.1, 6.2). Both have the named-tensor
API (``num_io_tensors``, ``set_tensor_address``, ``execute_async_v3``, since 8.5), which is the
only one used: 10 removed the binding-index API, and 8.6's copy of it was never reached. JetPack
5 (TensorRT 8.5, Python 3.8) cannot run cellseg, which needs Python 3.10. The names used are
checked against the real Python bindings of 8.6.1 and 10.3.0 (tests/build/test_tensorrt_api.py).

The engine's I/O is described by :func:`plan_io`, pure Python and checked on any machine.
Page-locked host buffers, device buffers, one stream and the execution context are made in
``load`` and released in reverse order in ``close``. TensorRT's log goes to the
``cellseg.tensorrt`` logger; CUDA errors become :class:`CudaError` naming the call that failed.

All GPU imports happen inside ``load``: importing this module needs neither TensorRT nor CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.engines.base import LoadedInWith, RawOutputs
from cellseg.edge.errors import ConfigError, CudaError, DependencyError, ModelError
from cellseg.edge.hashing import file_sha256
from cellseg.edge.pipeline.model_info import ModelInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: float32, float16, int8, ...
    is_input: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class IoPlan:
    """Which tensor is which, in the engine's binding order."""

    tensors: tuple[TensorSpec, ...]
    input: TensorSpec
    predictions: TensorSpec
    prototypes: TensorSpec

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_io(tensors: Sequence[TensorSpec], info: ModelInfo, source: object = "engine") -> IoPlan:
    """Check an engine's tensors against the model it claims to be; name the mismatch."""
    inputs = [t for t in tensors if t.is_input]
    outputs = [t for t in tensors if not t.is_input]
    expected_in = (1, 3, info.input_height, info.input_width)
    if len(inputs) != 1 or inputs[0].shape != expected_in:
        got = [(t.name, t.shape) for t in inputs]
        raise ModelError(f"{source}: expected one input of shape {expected_in}, got {got}")
    if any(-1 in t.shape for t in tensors):
        raise ModelError(f"{source}: dynamic shapes are not supported; build the engine with static shapes")
    preds = [t for t in outputs if len(t.shape) == 3]
    protos = [t for t in outputs if len(t.shape) == 4]
    if len(outputs) != 2 or len(preds) != 1 or len(protos) != 1:
        raise ModelError(
            f"{source}: expected outputs (1, 4+nc+nm, A) and (1, nm, h, w), got {[t.shape for t in outputs]}"
        )
    nm = protos[0].shape[1]
    if preds[0].shape[1] != 4 + info.num_classes + nm:
        raise ModelError(f"{source}: predictions have {preds[0].shape[1]} rows, expected 4 + {info.num_classes} + {nm}")
    for t in tensors:
        if t.dtype not in ("float32", "float16"):
            raise ModelError(f"{source}: tensor {t.name} is {t.dtype}; cellseg feeds and reads float32/float16")
    return IoPlan(tuple(tensors), inputs[0], preds[0], protos[0])


def supported_tensorrt(version: str) -> int:
    """The major version (8 or 10) of a supported TensorRT; DependencyError naming what is."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ConfigError(f"cannot read TensorRT version {version!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) >= (8, 6) and major in (8, 10):
        return major
    raise DependencyError(
        "tensorrt",
        "trt",
        f"TensorRT {version} is not supported (8.6 on JetPack 6.0 or 10.x on JetPack 6.1/6.2 are); engines",
    )


def io_tensors(engine: Any, trt: Any) -> list[TensorSpec]:
    """The engine's inputs and outputs, by the named-tensor API (TensorRT 8.5 and later)."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        out.append(
            TensorSpec(
                name=name,
                shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
                dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name,
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
            )
        )
    return out


@functools.cache
def tensorrt_logger(trt: Any) -> Any:
    """The ``ILogger`` that sends TensorRT's messages to the ``cellseg.tensorrt`` logger.

    One per process, on purpose: TensorRT keeps the first logger a Builder or Runtime is given
    for the whole process and ignores later ones, and that Python object must outlive every
    Builder and Runtime that points at it. (A new bridge per call was never used and could be
    collected while TensorRT still held it.)
    """
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.INFO,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }
    trt_log = logging.getLogger("cellseg.tensorrt")

    class Bridge(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            trt_log.log(levels.get(severity, logging.INFO), "%s", msg)

    return Bridge()


class TensorRTEngine(LoadedInWith):
    """Runs a TensorRT plan built by ``cellseg build-engine``.

    Args:
        path: the plan file (from an installed bundle slot).
        info: the model's metadata (from the bundle's manifest: a plan carries none).
        precision: as built (fp16 or int8), for reporting.
        device: CUDA device index.
    """

    def __init__(self, path: str | Path, info: ModelInfo, precision: str = "fp16", device: int = 0) -> None:
        self.path = Path(path)
        self.info = info
        self.precision = precision
        self.device = device
        self.engine_id = ""
        self.io: IoPlan | None = None
        self._cuda: Any = None
        self._ctx: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._host: dict[str, Any] = {}
        self._dev: dict[str, Any] = {}

    def load(self) -> None:
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as e:
            raise DependencyError("tensorrt/pycuda", "trt", "the TensorRT engine (JetPack provides TensorRT)") from e
        self._cuda = cuda
        supported_tensorrt(str(trt.__version__))
        try:
            cuda.init()
            self._ctx = cuda.Device(self.device).retain_primary_context()
            self._ctx.push()
        except cuda.Error as e:
            raise CudaError(f"cannot open CUDA device {self.device}: {e}") from e
        failure: BaseException | None = None
        io_bytes = 0
        try:
            self._runtime = trt.Runtime(tensorrt_logger(trt))
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise ModelError(
                    f"{self.path}: TensorRT {trt.__version__} cannot deserialise it (built for another version or "
                    "GPU, or truncated)"
                )
            self.io = plan_io(io_tensors(self._engine, trt), self.info, self.path)
            io_bytes = self.io.total_bytes
            self._context = self._engine.create_execution_context()
            self._stream = cuda.Stream()
            for t in self.io.tensors:
                self._host[t.name] = cuda.pagelocked_empty(t.shape, np.dtype(t.dtype))
                self._dev[t.name] = cuda.mem_alloc(t.nbytes)
                self._context.set_tensor_address(t.name, int(self._dev[t.name]))
        except cuda.Error as e:
            failure = CudaError(f"allocating the engine's buffers failed: {e}")
            failure.__cause__ = e
        except BaseException as e:
            failure = e
        finally:
            self._ctx.pop()
        if failure is not None:
            self.close()
            raise failure
        self.engine_id = f"tensorrt:{self.path.name}:{file_sha256(self.path)[:12]}"
        logger.info("loaded %s (TensorRT %s, %s, %.1f MB of I/O buffers)", self.path, trt.__version__,
                    self.precision, io_bytes / 1e6)  # fmt: skip

    def warmup(self, runs: int = 1) -> None:
        dummy = np.full((1, 3, self.info.input_height, self.info.input_width), 114 / 255, dtype=np.float32)
        for _ in range(runs):
            self.infer(dummy)

    def infer(self, tensor: npt.NDArray[np.float32]) -> RawOutputs:
        if self.io is None or self._context is None:
            raise ModelError("engine is not loaded (call load() first)")
        cuda, io = self._cuda, self.io
        self._ctx.push()
        try:
            np.copyto(self._host[io.input.name], tensor.reshape(io.input.shape), casting="same_kind")
            cuda.memcpy_htod_async(self._dev[io.input.name], self._host[io.input.name], self._stream)
            ok = self._context.execute_async_v3(self._stream.handle)
            if not ok:
                raise CudaError("TensorRT refused to enqueue the inference")
            for t in (io.predictions, io.prototypes):
                cuda.memcpy_dtoh_async(self._host[t.name], self._dev[t.name], self._stream)
            self._stream.synchronize()
        except cuda.Error as e:
            raise CudaError(f"inference failed on the GPU: {e}") from e
        finally:
            self._ctx.pop()
        preds = np.asarray(self._host[io.predictions.name][0], dtype=np.float32)
        protos = np.asarray(self._host[io.prototypes.name][0], dtype=np.float32)
        return RawOutputs(predictions=preds.copy(), prototypes=protos.copy())

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """This engine's CUDA context made current (for kernels sharing its buffers)."""
        if self._ctx is None:
            raise ModelError("engine is not loaded (call load() first)")
        self._ctx.push()
        try:
            yield
        finally:
            self._ctx.pop()

    def device_buffer(self, name: str) -> Any:
        """The device allocation of tensor ``name`` (input, predictions or prototypes)."""
        return self._dev[name]

    def execute_on_device(self) -> None:
        """Run on what is already in the input's device buffer; outputs stay on the device.
        Call inside :meth:`active`."""
        if self.io is None or self._context is None:
            raise ModelError("engine is not loaded (call load() first)")
        cuda = self._cuda
        try:
            ok = self._context.execute_async_v3(self._stream.handle)
            if not ok:
                raise CudaError("TensorRT refused to enqueue the inference")
            self._stream.synchronize()
        except cuda.Error as e:
            raise CudaError(f"inference failed on the GPU: {e}") from e

    def close(self) -> None:
        """Free in reverse order of creation: buffers, stream, context, engine, runtime, CUDA context."""
        for allocation in reversed(list(self._dev.values())):
            allocation.free()
        self._dev.clear()
        self._host.clear()
        self._stream = None
        self._context = None
        self._engine = None
        self._runtime = None
        if self._ctx is not None:
            self._ctx.detach()
            self._ctx = None
        self.io = None
