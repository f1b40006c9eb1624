"""The CUDA kernels compile with NVRTC for every architecture cellseg lists, without nvcc and
without a GPU: CUDA 12.6's NVRTC (JetPack 6.1/6.2's CUDA) from PyPI, each cubin checked to be an
ELF file for that architecture holding every kernel. Loading one needs a GPU, which is the
one-shot GPU check's part."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg.edge.engines.kernel_compile import (
    ARCHITECTURES,
    KERNEL_FILES,
    NVRTC_ENV,
    Nvrtc,
    cubin_arch,
    find_nvrtc,
    kernel_cubins,
    kernel_names,
    kernel_source,
)
from cellseg.edge.errors import KernelBuildError
from tests.packaging import cache_folder, unpacked_wheel

NVRTC_WHEEL = "nvidia-cuda-nvrtc-cu12==12.6.85"


@pytest.fixture(scope="module")
def nvrtc_library() -> Path:
    where = unpacked_wheel(NVRTC_WHEEL, cache_folder() / "nvrtc-12.6")
    return where / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"


@pytest.fixture(scope="module")
def nvrtc(nvrtc_library: Path) -> Nvrtc:
    compiler = Nvrtc(nvrtc_library)
    assert compiler.version == "12.6"
    return compiler


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_kernel_compiles_for_every_listed_architecture(nvrtc: Nvrtc, arch: str) -> None:
    cubins = kernel_cubins(arch, nvrtc=nvrtc)
    assert sorted(cubins) == sorted(KERNEL_FILES)
    for name, cubin in cubins.items():
        assert cubin_arch(cubin) == arch
        for kernel in kernel_names(kernel_source(name)):
            assert b".text." + kernel.encode() in cubin, f"{kernel} is not in the {arch} cubin of {name}.cu"


def test_cubins_are_cached_by_source_architecture_and_compiler(nvrtc_library: Path, tmp_path: Path) -> None:
    class Counting(Nvrtc):
        def __init__(self, library: Path) -> None:
            super().__init__(library)
            self.compiles = 0

        def compile(self, source: str, name: str, arch: str) -> bytes:
            self.compiles += 1
            return super().compile(source, name, arch)

    counting = Counting(nvrtc_library)
    first = kernel_cubins("sm_87", tmp_path, nvrtc=counting)
    assert counting.compiles == len(KERNEL_FILES)
    assert kernel_cubins("sm_87", tmp_path, nvrtc=counting) == first  # read back, not compiled again
    assert counting.compiles == len(KERNEL_FILES)
    assert sorted(p.name.split("-")[:2] for p in tmp_path.iterdir()) == [[n, "sm_87"] for n in sorted(KERNEL_FILES)]
    kernel_cubins("sm_72", tmp_path, nvrtc=counting)  # another architecture is another entry
    assert counting.compiles == 2 * len(KERNEL_FILES)


def test_a_compile_error_carries_nvrtcs_log(nvrtc: Nvrtc) -> None:
    with pytest.raises(KernelBuildError, match=r"compiling broken\.cu for sm_87 failed(.|\n)*undefined_thing"):
        nvrtc.compile('extern "C" __global__ void k(float* x) { x[0] = undefined_thing; }', "broken.cu", "sm_87")
    with pytest.raises(KernelBuildError, match="not a CUDA cubin"):
        cubin_arch(b"\x7fELF" + bytes(60))


def test_the_environment_names_the_compiler_first(nvrtc_library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NVRTC_ENV, str(nvrtc_library))
    assert find_nvrtc() == nvrtc_library


def test_the_doctor_says_whether_the_kernels_compile_for_this_gpu(
    nvrtc_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU's facts are made up (there is no GPU here); NVRTC and the kernels are real."""
    from cellseg.edge.config import parse_config
    from cellseg.edge.device import DeviceFacts
    from cellseg.edge.tools import doctor

    config = parse_config({"device_id": "orin-1", "source": {"kind": "images", "images": ["x.png"]}})
    orin = DeviceFacts(tensorrt="10.3.0", compute_capability="8.7", l4t="36.4.0")
    monkeypatch.setattr(DeviceFacts, "detect", classmethod(lambda cls: orin))
    monkeypatch.setenv(NVRTC_ENV, str(nvrtc_library))
    (check,) = doctor.check_kernels(config, Path("cellseg.yaml"))
    assert (check.status, check.detail) == ("ok", "NVRTC 12.6 compiles the CUDA kernels for sm_87")
    monkeypatch.setattr("cellseg.edge.engines.kernel_compile.find_nvrtc", lambda: None)
    (check,) = doctor.check_kernels(config, Path("cellseg.yaml"))
    assert check.status == "warn" and "nvidia-cuda-nvrtc-cu12" in check.fix
