"""What this device can run: ONNX Runtime and TensorRT versions, GPU compute capability, L4T.

A TensorRT plan runs only on the GPU architecture (compute capability) and the TensorRT version
it was built with; :func:`check_compatible` refuses a bundle built for anything else, with the
facts on both sides in the message. Detection imports nothing heavy unless it is installed.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cellseg.edge.bundles.reader import EngineSpec
from cellseg.edge.errors import BundleError

logger = logging.getLogger(__name__)

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")

# The device nodes CUDA (and so TensorRT) opens, by machine kind. The unit's DeviceAllow= lists
# every one of them (tests/systemd/test_unit.py keeps the two in step); `cellseg doctor` checks that
# the service user can open those present. Collected from NVIDIA's container-runtime CSV lists
# and projects that sandbox CUDA on Orin: JetPack 6 (L4T r36) moved the iGPU to /dev/nvgpu/igpu0/
# and needs a DRM render node for cuInit; JetPack 5 uses the nvhost-*-gpu nodes; both use nvmap.
GPU_DEVICE_NODES: dict[str, tuple[str, ...]] = {
    "jetson": (
        "/dev/nvmap",
        "/dev/host1x-fence",
        "/dev/nvhost-ctrl",
        "/dev/nvhost-ctrl-gpu",
        "/dev/nvhost-gpu",
        "/dev/nvhost-as-gpu",
        "/dev/nvhost-tsg-gpu",
        "/dev/nvhost-dbg-gpu",
        "/dev/nvhost-prof-gpu",
        "/dev/nvhost-ctxsw-gpu",
        "/dev/nvhost-sched-gpu",
        "/dev/nvhost-power-gpu",
        "/dev/nvhost-nvsched-gpu",
        "/dev/nvgpu/igpu0/ctrl",
        "/dev/nvgpu/igpu0/as",
        "/dev/nvgpu/igpu0/channel",
        "/dev/nvgpu/igpu0/tsg",
        "/dev/nvgpu/igpu0/power",
        "/dev/nvgpu/igpu0/sched",
        "/dev/nvgpu/igpu0/nvsched",
        "/dev/nvgpu/igpu0/nvsched_ctrl_fifo",
        "/dev/nvgpu/igpu0/ctxsw",
        "/dev/nvgpu/igpu0/dbg",
        "/dev/nvgpu/igpu0/prof",
        "/dev/nvgpu/igpu0/prof-ctx",
        "/dev/nvgpu/igpu0/prof-dev",
        "/dev/dri/renderD128",
        "/dev/dri/renderD129",
        "/dev/nvidia0",
        "/dev/nvidiactl",
    ),
    # x86 boxes with an NVIDIA card: the unit allows these by device group (char-nvidia-frontend,
    # char-nvidia-uvm, char-nvidia-caps), which also covers further GPUs.
    "dgpu": ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"),
}


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
            onnxruntime=dist_version("onnxruntime", "onnxruntime-gpu"),
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


def dist_version(*names: str) -> str | None:
    """The installed version of the first of these distributions pip knows, else None."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _tensorrt_version() -> str | None:
    version = dist_version("tensorrt", "tensorrt-cu12", "tensorrt_cu12")
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


def physical_cores(sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among the CPUs this process may run on (ONNX Runtime's own default count).

    SMT siblings share a core; counting them would give the engine threads that compete for the
    same execution units. Falls back to the logical count where sysfs has no topology.
    """
    cpus = sorted(os.sched_getaffinity(0))
    cores: set[str] = set()
    for cpu in cpus:
        try:
            siblings = (sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add(siblings)
    return max(1, len(cores))


def jetpack_for(l4t: str) -> str:
    """The JetPack a Jetson Linux (L4T) release comes with, for reports: ``36.4.3`` -> ``6.2``."""
    releases = {"36.4.3": "6.2", "36.4": "6.1", "36.3": "6.0", "35": "5.1", "34": "5.0", "32": "4"}
    for prefix, jetpack in releases.items():
        if l4t == prefix or l4t.startswith(prefix + "."):
            return jetpack
    return "unknown"


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


def device_name() -> str:
    """The board (Jetsons name themselves in the device tree) or the CPU model, and its core count."""
    name = platform.processor() or platform.machine()
    board = Path("/proc/device-tree/model")
    cpuinfo = Path("/proc/cpuinfo")
    if board.is_file():
        name = board.read_text(errors="replace").strip("\x00\n ")
    elif cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        name = models[0] if models else name
    return f"{name} ({os.cpu_count()} cores)"


# The CPU extensions that compute bfloat16 natively (elsewhere it is emulated, slower than float32).
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's instruction-set extensions as the kernel lists them (x86 ``flags``, Arm ``Features``);
    empty where there is no /proc/cpuinfo."""
    if not cpuinfo.is_file():
        return frozenset()
    flags: set[str] = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)
