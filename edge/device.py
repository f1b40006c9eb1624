"""What this device can run: ONNX Runtime and TensorRT versions, GPU compute capability, L4T.

A TensorRT plan runs only on the GPU architecture (compute capability) and the TensorRT version
it was built with; :func:`check_compatible` refuses a bundle built for anything else, with the
facts on both sides in the message. Detection imports nothing heavy unless it is installed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cellseg.edge.bundle import BundleError, EngineSpec

logger = logging.getLogger(__name__)

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")


@dataclass(frozen=True)
class DeviceFacts:
    """Versions are strings as the libraries print them; ``None``: not present on this device."""

    onnxruntime: str | None = None
    tensorrt: str | None = None
    compute_capability: str | None = None
    l4t: str | None = None

    @classmethod
    def detect(cls) -> DeviceFacts:
        return cls(
            onnxruntime=_dist_version("onnxruntime", "onnxruntime-gpu"),
            tensorrt=_tensorrt_version(),
            compute_capability=_compute_capability(),
            l4t=l4t_release(NV_TEGRA_RELEASE),
        )

    def describe(self) -> str:
        parts = [f"ONNX Runtime {self.onnxruntime}" if self.onnxruntime else "no ONNX Runtime"]
        parts.append(f"TensorRT {self.tensorrt}" if self.tensorrt else "no TensorRT")
        if self.compute_capability:
            parts.append(f"GPU compute capability {self.compute_capability}")
        if self.l4t:
            parts.append(f"L4T {self.l4t}")
        return ", ".join(parts)


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _tensorrt_version() -> str | None:
    version = _dist_version("tensorrt", "tensorrt-cu12", "tensorrt_cu12")
    if version:
        return version
    try:  # JetPack installs TensorRT's Python bindings as a Debian package, without pip metadata
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        return None


def _compute_capability() -> str | None:
    try:
        import pycuda.driver as cuda
    except ImportError:
        return None
    try:
        cuda.init()
        major, minor = cuda.Device(0).compute_capability()
        return f"{major}.{minor}"
    except Exception as e:  # a driver without a usable GPU: report none rather than fail detection
        logger.warning("CUDA is installed but no GPU answers: %s", e)
        return None


def l4t_release(path: Path) -> str | None:
    """``36.4.0`` from ``# R36 (release), REVISION: 4.0, ...`` (Jetson's /etc/nv_tegra_release)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _release(version: str) -> tuple[int, ...]:
    """Major, minor, patch of a version such as ``10.3.0.30`` (the build number does not matter)."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def check_compatible(engine: EngineSpec, facts: DeviceFacts) -> None:
    """Raises BundleError naming the mismatch when this device cannot run ``engine``."""
    if engine.kind == "onnx":
        if facts.onnxruntime is None:
            raise BundleError("bundle holds an ONNX model but this device has no ONNX Runtime")
        return
    want = f"TensorRT {engine.tensorrt_version} on compute capability {engine.compute_capability}"
    if engine.tensorrt_version is None or engine.compute_capability is None:
        raise BundleError("TensorRT bundle does not say which TensorRT version and GPU it was built for")
    if facts.tensorrt is None:
        raise BundleError(f"bundle holds a TensorRT engine built for {want}; this device has no TensorRT")
    if _release(engine.tensorrt_version) != _release(facts.tensorrt):
        raise BundleError(
            f"engine was built with TensorRT {engine.tensorrt_version}; this device has TensorRT {facts.tensorrt} "
            "(TensorRT engines only load in the version that built them: rebuild it on this device)"
        )
    if facts.compute_capability is None:
        raise BundleError(f"bundle holds a TensorRT engine built for {want}; no GPU answers on this device")
    if engine.compute_capability != facts.compute_capability:
        raise BundleError(
            f"engine was built for compute capability {engine.compute_capability}; this GPU is "
            f"compute capability {facts.compute_capability}"
        )
    if engine.l4t and facts.l4t and engine.l4t.split(".")[0] != facts.l4t.split(".")[0]:
        raise BundleError(f"engine was built on L4T {engine.l4t}; this device runs L4T {facts.l4t}")
