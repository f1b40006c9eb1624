"""Every exception cellseg raises on purpose, in this one module and one tree, so callers can
catch at the depth they need (the daemon: any ``CellsegError`` is a known failure of one frame
or one command, anything else a bug it logs with its traceback).

    CellsegError
    ├── ConfigError          a config file or option is invalid (names the key path)
    ├── ImageReadError       an image file is missing, corrupt or of an unsupported kind
    ├── FrameError           a frame array has an unsupported shape or pixel type
    ├── ContractError        a value passed between stages breaks its type's contract (a
    │                        backend's detections or measurement of the wrong shape or range)
    ├── DatasetError         a dataset or annotation is malformed (names file and annotation)
    ├── ModelError           a model file is not a usable YOLO-seg export
    │   └── ModelMetadataError   its metadata is missing or inconsistent
    ├── DependencyError      an optional dependency needed for this command is not installed
    ├── BundleError          an engine bundle is refused (signature, hashes, device); the reason
    ├── SlotError            an engine-slot operation (activate, roll back) cannot be done
    ├── CudaError            a CUDA or TensorRT runtime call failed on the device
    ├── KernelBuildError     the CUDA kernels do not compile for this GPU (NVRTC's log)
    │   └── NvrtcMissingError    no NVRTC library on this machine
    ├── SpoolError           the measurement spool cannot be opened or written
    │   ├── SpoolFullError       full, and its policy is to stop measuring
    │   └── HistoryError         the measurement history (growth) cannot be opened or written
    └── CommandError         an MQTT command was refused; the reason goes back to the sender

FrameError and ContractError are ValueErrors too (they are bad values). Causes are chained
with ``raise ... from e`` so the original error stays visible.
"""

from __future__ import annotations


class CellsegError(Exception):
    """Base class of every error cellseg raises on purpose."""


class ConfigError(CellsegError):
    """A configuration file, recipe or option is invalid."""


class ImageReadError(CellsegError):
    """An image could not be read or is of an unsupported kind."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class FrameError(CellsegError, ValueError):
    """A frame array has a shape or pixel type the pipeline does not handle."""


class ContractError(CellsegError, ValueError):
    """A value passed between pipeline stages breaks its type's contract (shape, dtype, range)."""


class DatasetError(CellsegError):
    """A dataset, annotation file or single annotation is malformed."""


class ModelError(CellsegError):
    """A model file is missing, unreadable or not a YOLO-seg export."""


class ModelMetadataError(ModelError):
    """A model's embedded metadata is missing or inconsistent."""


class DependencyError(CellsegError):
    """An optional dependency is needed for this operation but not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed; "
            f"install it with: pip install 'cellseg[{extra}]'"
        )
        self.package = package
        self.extra = extra


class BundleError(CellsegError):
    """A bundle was refused; the message is the reason, fit for a flash reply."""


class SlotError(CellsegError):
    """A slot operation (rollback, activation) cannot be done."""


class CudaError(CellsegError):
    """A CUDA or TensorRT runtime call failed on the device."""


class KernelBuildError(CellsegError):
    """The CUDA kernels could not be compiled for this GPU; the message carries NVRTC's log."""


class NvrtcMissingError(KernelBuildError):
    """No NVRTC library on this machine (then pycuda's nvcc is the only way left)."""


class SpoolError(CellsegError):
    """The spool file cannot be opened or written."""


class SpoolFullError(SpoolError):
    """The spool holds ``max_messages`` and its policy is ``stop_measuring``."""


class HistoryError(SpoolError):
    """The measurement history (per series, for growth fits) cannot be opened or written."""


class CommandError(CellsegError):
    """A command that cannot be accepted; the message is sent back to the requester."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
