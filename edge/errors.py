"""The exceptions cellseg raises, one tree so callers can catch at the depth they need.

    CellsegError
    ├── ConfigError          a config file or option is invalid (names the key path)
    ├── ImageReadError       an image file is missing, corrupt or of an unsupported kind
    ├── FrameError           a frame array has an unsupported shape or pixel type
    ├── DatasetError         a dataset or annotation is malformed (names file and annotation)
    ├── ModelError           a model file is not a usable YOLO-seg export
    │   └── ModelMetadataError   its metadata is missing or inconsistent
    ├── DependencyError      an optional dependency needed for this command is not installed
    ├── SpoolError           the measurement spool cannot be opened or written   (spool.py)
    │   └── SpoolFullError       full, and its policy is to stop measuring
    ├── KernelBuildError     the CUDA kernels do not compile for this GPU (kernel_compile.py)
    │   └── NvrtcMissingError    no NVRTC library on this machine
    └── CommandError         an MQTT command was refused; the reason goes back    (commands.py)

Causes are chained with ``raise ... from e`` so the original error stays visible.
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
