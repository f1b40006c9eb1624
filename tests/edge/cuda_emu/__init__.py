"""Run cellseg's CUDA kernel sources on the CPU: compile each ``.cu`` with g++ through
``emulate.h`` and call its kernels through ctypes, as a :class:`KernelRunner`.

A launcher is generated for every ``__global__`` function found in the sources; its arguments
are converted by their declared C types, so a kernel whose signature changes is still called
correctly (or fails loudly).
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.engines.kernel_compile import KERNEL_DIR, KERNEL_FILES

HERE = Path(__file__).resolve().parent
_SIGNATURE = re.compile(r"__global__\s+void\s+(\w+)\s*\(([^)]*)\)", re.S)
_SCALARS = {"int": ctypes.c_int, "float": ctypes.c_float, "unsigned int": ctypes.c_uint, "unsigned": ctypes.c_uint}


def kernel_signatures(source: str) -> dict[str, list[tuple[str, str]]]:
    """``name -> [(C type, parameter name), ...]`` for each ``__global__`` function."""
    out = {}
    for name, params in _SIGNATURE.findall(source):
        args = []
        for raw in " ".join(params.split()).split(","):
            p = raw.strip()
            m = re.match(r"(.*?[\s*])(\w+)$", p)
            assert m, f"cannot parse parameter {p!r} of kernel {name}"
            args.append((m.group(1).strip(), m.group(2)))
        out[name] = args
    return out


def _ctype(c_type: str) -> Any:
    if "*" in c_type:
        return ctypes.c_void_p
    base = c_type.replace("const ", "").strip()
    if base not in _SCALARS:
        raise TypeError(f"the emulation does not pass C type {c_type!r}")
    return _SCALARS[base]


def build_library(workdir: Path, names: tuple[str, ...] = KERNEL_FILES) -> tuple[ctypes.CDLL, dict[str, Any]]:
    """Compile the kernels with a generated launcher each; returns the library and signatures."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise RuntimeError("g++ is needed to run the CUDA kernels on the CPU")
    lines = ['#include "emulate.h"']
    signatures: dict[str, Any] = {}
    for name in names:
        path = KERNEL_DIR / f"{name}.cu"
        lines.append(f'#include "{path}"')
        signatures.update(kernel_signatures(path.read_text()))
    for kernel, params in signatures.items():
        decl = ", ".join(f"{t} {n}" for t, n in params)
        call = ", ".join(n for _, n in params)
        lines.append(
            f'extern "C" void launch_{kernel}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
            f"unsigned bz, int threaded, {decl}) {{ emu::threaded = threaded != 0; "
            f"emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), [&] {{ {kernel}({call}); }}); }}"
        )
    shim = "\n".join(lines) + "\n"
    digest = hashlib.sha256((shim + (HERE / "emulate.h").read_text()).encode())
    for name in names:
        digest.update((KERNEL_DIR / f"{name}.cu").read_bytes())
    lib_path = workdir / f"kernels-{digest.hexdigest()[:16]}.so"
    if not lib_path.exists():
        src = workdir / "shim.cpp"
        src.write_text(shim)
        cmd = [compiler, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
               "-Wno-unused-function", f"-I{HERE}", "-o", str(lib_path), str(src)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"compiling the kernels failed:\n{done.stderr}")
    lib = ctypes.CDLL(str(lib_path))
    for kernel, params in signatures.items():
        fn = getattr(lib, f"launch_{kernel}")
        fn.restype = None
        fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_int] + [_ctype(t) for t, _ in params]
    return lib, signatures


class EmulatedRunner:
    """A KernelRunner whose device memory is numpy arrays and whose launches run on the CPU."""

    def __init__(self, lib: ctypes.CDLL, signatures: dict[str, Any], threaded: bool = False) -> None:
        self.lib = lib
        self.signatures = signatures
        self.threaded = threaded
        self.launches: list[str] = []

    def upload(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.array(array, copy=True, order="C")

    def zeros(self, count: int, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        return np.zeros(max(count, 1), dtype=dtype)

    def download(self, buffer: npt.NDArray[Any], count: int, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        flat = buffer.reshape(-1)
        assert flat.dtype == np.dtype(dtype), (flat.dtype, dtype)
        return flat[:count].copy()

    def launch(self, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int], *args: Any) -> None:
        params = self.signatures[kernel]
        if len(args) != len(params):
            raise TypeError(f"{kernel} takes {len(params)} arguments, got {len(args)}")
        converted = []
        for (c_type, name), value in zip(params, args, strict=True):
            if "*" in c_type:
                if value is not None and not isinstance(value, np.ndarray):
                    raise TypeError(f"{kernel}.{name} wants a buffer, got {type(value).__name__}")
                converted.append(None if value is None else value.ctypes.data)
            else:
                converted.append(value.item() if isinstance(value, np.generic) else value)
        self.launches.append(kernel)
        getattr(self.lib, f"launch_{kernel}")(*grid, *block, int(self.threaded), *converted)
