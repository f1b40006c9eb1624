"""Every pycuda name the code uses exists in each supported pycuda release (the oldest the ``trt``
extra allows and the newest), read from the code and looked up in the release's own source
(:mod:`tests.pycuda_source`: pycuda cannot be built or imported without CUDA). A misspelt or
removed name -- a method, a module function, a keyword of a kernel call -- fails here, not on
a Jetson.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api_usage import Library, used_names
from tests.packaging import cache_folder, unpacked_sdist
from tests.pycuda_source import VERSIONS, PycudaApi, read_api

REPO = Path(__file__).resolve().parents[2]
# How each module refers to pycuda: the variable bound to ``pycuda.driver`` and those holding its objects.
_DRIVER = {"cuda": "driver", "_cuda": "driver", "SourceModule": "compiler.SourceModule"}
_RETURNS = {
    "driver.Device.retain_primary_context": "driver.Context",
    "driver.Context.get_device": "driver.Device",
    "driver.module_from_buffer": "driver.Module",
    "driver.Module.get_function": "driver.Function",
    "compiler.SourceModule": "driver.Module",  # a SourceModule is used as the Module it wraps
    "driver.mem_alloc": "driver.DeviceAllocation",
}
_ENGINE = {"_ctx": "driver.Context", "_stream": "driver.Stream", "_dev": "driver.DeviceAllocation[]",
           "allocation": "driver.DeviceAllocation"}  # fmt: skip
USES = {
    REPO / "edge/engines/tensorrt_engine.py": Library(_DRIVER, _ENGINE, _RETURNS),
    REPO / "edge/engines/cuda_kernels.py": Library(_DRIVER, {"_functions": "driver.Function[]",
                                                             "module": "driver.Module"}, _RETURNS),
    REPO / "edge/engines/cuda_pipeline.py": Library(_DRIVER, {}, _RETURNS),
    REPO / "edge/device.py": Library(_DRIVER, {}, _RETURNS),
    REPO / "build/trt_calibrator.py": Library(_DRIVER, {"context": "driver.Context",
                                                        "_device": "driver.DeviceAllocation"}, _RETURNS),
}  # fmt: skip


def names_in_code() -> set[str]:
    return used_names(USES)


def test_the_code_reading_finds_what_it_should() -> None:
    """The reading must see the names it exists for (else the real check below checks nothing)."""
    names = names_in_code()
    for expected in ("driver.init", "driver.Device", "driver.Device.retain_primary_context", "driver.Context.push",
                     "driver.Context.pop", "driver.Context.detach", "driver.Context.get_device",
                     "driver.Device.compute_capability", "driver.Stream.handle", "driver.Stream.synchronize",
                     "driver.mem_alloc", "driver.memcpy_htod_async", "driver.pagelocked_empty", "driver.Error",
                     "driver.module_from_buffer", "driver.Module.get_function", "driver.to_device",
                     "driver.Function.__call__(block)", "driver.Function.__call__(grid)",
                     "driver.DeviceAllocation.free", "compiler.SourceModule"):  # fmt: skip
        assert expected in names, expected


@pytest.fixture(scope="module", params=VERSIONS)
def api(request: pytest.FixtureRequest) -> PycudaApi:
    version = str(request.param)
    return read_api(unpacked_sdist("pycuda", version, cache_folder() / f"pycuda-{version}"), version)


def test_every_pycuda_name_the_code_uses_exists_in_the_release(api: PycudaApi) -> None:
    wanted = sorted(names_in_code())
    missing = [name for name in wanted if not api.has(name)]
    assert not missing, f"pycuda {api.version} has no {', '.join(missing)}"
    assert len(wanted) >= 20


def test_a_wrong_name_would_be_caught(api: PycudaApi) -> None:
    """The reading of pycuda's source is not so loose that anything passes."""
    wrong = ["driver.mem_allocate", "driver.Context.push_current", "driver.Stream.sync",
             "driver.Function.__call__(threads)", "driver.Module.function", "compiler.NvrtcModule",
             "driver.DeviceAllocation.release"]  # fmt: skip
    assert [name for name in wrong if api.has(name)] == []
    assert len(api.driver) > 100 and len(api.classes["Context"]) >= 8
