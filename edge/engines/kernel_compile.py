"""The CUDA kernels (``edge/engines/kernels/*.cu``) compiled with NVRTC, without nvcc on the device.

pycuda's ``SourceModule`` runs ``nvcc``, which a systemd service does not find (it lives in
``/usr/local/cuda/bin``, not on the unit's PATH) and a device need not have at all. NVRTC is a
library: JetPack installs ``libnvrtc.so`` with CUDA, and PyPI has it as ``nvidia-cuda-nvrtc-cu12``
for machines without a toolkit, CI included. Each kernel file is compiled for the GPU's own
architecture into a cubin (``sm_87`` on Orin), cached in the state folder under a name that
carries the source's hash, the architecture and NVRTC's version, and loaded with pycuda's
``module_from_buffer``. The sources are wrapped in ``extern "C"`` exactly as ``SourceModule``
wraps them, so the kernel names and the CPU emulation in the tests stay the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import hashlib
import logging
import os
import re
import struct
from pathlib import Path

from cellseg.edge.errors import KernelBuildError, NvrtcMissingError

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
KERNEL_FILES = ("preprocess", "postprocess")
# Nano (JetPack 4), Xavier (JetPack 5), Orin (JetPack 6), and dGPU boxes (Ada, Hopper).
ARCHITECTURES = ("sm_53", "sm_72", "sm_87", "sm_89", "sm_90")
NVRTC_ENV = "CELLSEG_NVRTC"
EM_CUDA = 190  # the ELF machine number of a CUDA cubin


def kernel_source(name: str) -> str:
    """The CUDA source of ``kernels/<name>.cu`` (package data)."""
    return (KERNEL_DIR / f"{name}.cu").read_text()


def kernel_names(source: str) -> list[str]:
    """The ``__global__`` functions a source defines, in order."""
    return re.findall(r"__global__\s+void\s+(\w+)\s*\(", source)


def find_nvrtc() -> Path | None:
    """``$CELLSEG_NVRTC``; CUDA's own (JetPack's ``/usr/local/cuda``, or the dynamic linker's);
    else an NVRTC wheel from PyPI (``nvidia-cuda-nvrtc-cu12``, or CUDA 13's, which torch brings)."""
    candidates = [os.environ.get(NVRTC_ENV, "")]
    candidates += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so.*")) + sorted(
        glob.glob("/usr/local/cuda*/targets/*/lib/libnvrtc.so.*")
    )
    candidates.append(ctypes.util.find_library("nvrtc") or "")
    try:
        import nvidia

        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so.*")))
    except ImportError:
        pass
    for candidate in candidates:
        name = os.path.basename(candidate)
        if not re.fullmatch(r"libnvrtc\.so(\.\d+)*", name):
            continue  # not libnvrtc-builtins, not the .alt variant
        if os.path.sep not in candidate or Path(candidate).is_file():
            return Path(candidate)
    return None


class Nvrtc:
    """The few NVRTC calls a compile needs, through ctypes."""

    def __init__(self, library: Path) -> None:
        try:
            # NVRTC dlopens its builtins library by name, which a wheel's folder is not on the
            # search path for; loaded first, it is found among the loaded ones.
            for builtins in sorted(library.parent.glob("libnvrtc-builtins.so.*")):
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            self._lib = ctypes.CDLL(str(library))
        except OSError as e:
            raise NvrtcMissingError(f"NVRTC at {library} does not load: {e}") from e
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = f"{major.value}.{minor.value}"

    def _check(self, status: int, call: str, log: str = "") -> None:
        if status != 0:
            self._lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            text = self._lib.nvrtcGetErrorString(status).decode()
            raise KernelBuildError(f"{call} failed: {text}" + (f"\n{log}" if log else ""))

    def compile(self, source: str, name: str, arch: str) -> bytes:
        """A cubin of ``source`` for ``arch`` (``sm_87``); KernelBuildError with NVRTC's log."""
        program = ctypes.c_void_p()
        self._check(self._lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")  # fmt: skip
        try:
            options = [f"--gpu-architecture={arch}".encode()]
            status = self._lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
            size = ctypes.c_size_t()
            self._lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            self._lib.nvrtcGetProgramLog(program, log)
            self._check(status, f"compiling {name} for {arch}", log.value.decode(errors="replace"))
            self._check(self._lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(self._lib.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
            return cubin.raw
        finally:
            self._lib.nvrtcDestroyProgram(ctypes.byref(program))


def cubin_arch(cubin: bytes) -> str:
    """``sm_87`` from a cubin's ELF header; KernelBuildError if it is not a cubin.

    The SM number is a byte of e_flags: bits 0-7 in CUDA's ELF ABI version 7 (CUDA 12 and
    before: 0x570557 for sm_87), bits 8-15 in version 8 (CUDA 13: 0x6005704).
    """
    if len(cubin) < 52 or cubin[:4] != b"\x7fELF" or struct.unpack("<H", cubin[18:20])[0] != EM_CUDA:
        raise KernelBuildError("not a CUDA cubin (an ELF file for machine 190)")
    (flags,) = struct.unpack("<I", cubin[48:52])
    abi_version = cubin[8]
    return f"sm_{(flags >> 8) & 0xFF if abi_version >= 8 else flags & 0xFF}"


def kernel_cubins(arch: str, cache: Path | None = None, nvrtc: Nvrtc | None = None) -> dict[str, bytes]:
    """Every kernel file compiled for ``arch``, by file name; from ``cache`` when compiled before."""
    if nvrtc is None:
        library = find_nvrtc()
        if library is None:
            raise NvrtcMissingError(
                "no NVRTC library found: JetPack's CUDA has one in /usr/local/cuda/lib64; on other machines "
                f"install the CUDA toolkit or 'pip install nvidia-cuda-nvrtc-cu12', or set ${NVRTC_ENV}"
            )
        nvrtc = Nvrtc(library)
    out: dict[str, bytes] = {}
    for name in KERNEL_FILES:
        source = 'extern "C" {\n' + kernel_source(name) + "\n}\n"  # as pycuda's SourceModule wraps it
        key = hashlib.sha256(f"{source}\0{arch}\0{nvrtc.version}".encode()).hexdigest()[:16]
        cached = cache / f"{name}-{arch}-{key}.cubin" if cache is not None else None
        if cached is not None and cached.is_file():
            out[name] = cached.read_bytes()
            continue
        out[name] = nvrtc.compile(source, f"{name}.cu", arch)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(cached.name + f".{os.getpid()}")
            partial.write_bytes(out[name])
            partial.replace(cached)
            logger.info("compiled %s.cu for %s with NVRTC %s into %s", name, arch, nvrtc.version, cached)
    return out
