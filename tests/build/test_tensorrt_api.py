"""Every TensorRT name the code uses exists in the real Python bindings of each supported version
(8.6.1 for JetPack 6.0, 10.3.0 for JetPack 6.1/6.2), found by reading the code, not by a list
kept beside it: a misspelt or version-removed name fails here, not on a device.

Read from the code (:mod:`tests.api_usage`): every attribute chain on the module
(``trt.ILogger.Severity.ERROR``); the methods and properties used on TensorRT objects, by the
variables that hold them in each module (below) and through calls whose result type is known;
the methods our Python subclasses of TensorRT interfaces define, since a misspelt override is
silently never called; and the flag names :func:`plan_build` chooses for each version and
precision (it looks them up with ``getattr``). pycuda has its own test (tests/edge/test_pycuda_api.py).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cellseg.build.engine_build import plan_build
from tests.api_usage import Library, used_names
from tests.packaging import cache_folder
from tests.trt_bindings import DISTRIBUTIONS, bindings, missing_names

REPO = Path(__file__).resolve().parents[2]
_RETURNS = {"Builder.create_network": "INetworkDefinition", "Builder.create_builder_config": "IBuilderConfig",
            "IBuilderConfig.get_timing_cache": "ITimingCache", "IBuilderConfig.create_timing_cache": "ITimingCache",
            "Runtime.deserialize_cuda_engine": "ICudaEngine",
            "ICudaEngine.create_execution_context": "IExecutionContext"}  # fmt: skip
# How each module refers to TensorRT: the module itself is ``trt``; these variables hold its objects.
USES = {
    REPO / "edge/engines/tensorrt_engine.py": Library({"trt": ""}, {
        "engine": "ICudaEngine", "_engine": "ICudaEngine", "_context": "IExecutionContext", "_runtime": "Runtime"},
        _RETURNS),
    REPO / "build/engine_build.py": Library({"trt": ""}, {
        "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser", "config": "IBuilderConfig"},
        _RETURNS),
    REPO / "build/trt_calibrator.py": Library({"trt": ""}, {}, _RETURNS),
}  # fmt: skip
# Used only where the build plan says the version has it (plan.progress_monitor: TensorRT 10).
ONLY_IN_10 = {"IProgressMonitor", "IBuilderConfig.progress_monitor"}


def names_in_code() -> set[str]:
    return used_names(USES)


def names_for(version: str) -> set[str]:
    names = names_in_code()
    for precision, has_qdq in itertools.product(("fp16", "int8"), (False, True)):
        if precision == "fp16" and has_qdq:
            continue
        plan = plan_build(version, precision, has_qdq)  # type: ignore[arg-type]
        names |= {f"NetworkDefinitionCreationFlag.{n}" for n in plan.network_flags}
        names |= {f"BuilderFlag.{n}" for n in plan.builder_flags}
        if not plan.progress_monitor:
            names -= {n for n in names if n in ONLY_IN_10 or n.startswith("IProgressMonitor.")}
    return names


def test_the_code_reading_finds_what_it_should() -> None:
    """The reading must see the names it exists for (else the real check below checks nothing)."""
    names = names_in_code()
    for expected in ("Runtime", "TensorIOMode.INPUT", "ICudaEngine.num_io_tensors",
                     "IExecutionContext.execute_async_v3", "IExecutionContext.set_tensor_address",
                     "Builder.build_serialized_network",
                     "IBuilderConfig.set_memory_pool_limit", "IInt8EntropyCalibrator2.get_batch", "ILogger.log",
                     "IProgressMonitor.step_complete", "MemoryPoolType.WORKSPACE", "nptype"):  # fmt: skip
        assert expected in names, expected
    assert "NetworkDefinitionCreationFlag.EXPLICIT_BATCH" in names_for("8.6.1")
    assert "NetworkDefinitionCreationFlag.EXPLICIT_BATCH" not in names_for("10.3.0")


@pytest.fixture(scope="module")
def cache() -> Path:
    if shutil.which("gcc") is None or shutil.which("readelf") is None:
        pytest.skip("needs gcc and readelf to make the stand-in libraries")
    return cache_folder()


@pytest.mark.parametrize("version", sorted(DISTRIBUTIONS))
def test_every_tensorrt_name_the_code_uses_exists_in_the_real_bindings(version: str, cache: Path) -> None:
    wanted = sorted(names_for(version))
    found_version, missing = missing_names(bindings(version, cache), wanted)
    assert found_version == version
    assert not missing, f"TensorRT {version} has no {', '.join(missing)}"
    assert len(wanted) > 40  # the reading found the code's names, not a handful


def test_a_wrong_name_would_be_caught(cache: Path) -> None:
    gone = ["IExecutionContext.execute_async_v2", "ICudaEngine.num_bindings"]
    _, missing = missing_names(bindings("10.3.0", cache), [*gone, "IExecutionContext.execute_async_v3"])
    assert missing == gone  # the binding-index API, removed in 10


LOGGER_PROBE = """
import logging, sys
import tensorrt_bindings as trt
sys.modules["tensorrt"] = trt
from cellseg.edge.engines.tensorrt_engine import tensorrt_logger
seen = []
handler = logging.Handler()
handler.emit = lambda record: seen.append((record.levelname, record.getMessage()))
logging.getLogger("cellseg.tensorrt").addHandler(handler)
logging.getLogger("cellseg.tensorrt").setLevel(logging.DEBUG)
first, second = tensorrt_logger(trt), tensorrt_logger(trt)
assert first is second, "a second logger: TensorRT would ignore it"
assert isinstance(first, trt.ILogger)
first.log(trt.ILogger.Severity.WARNING, "from TensorRT")
first.log(trt.ILogger.Severity.VERBOSE, "detail")
print(seen)
"""


@pytest.mark.parametrize("version", sorted(DISTRIBUTIONS))
def test_one_logger_per_process_bridged_to_logging(version: str, cache: Path) -> None:
    """The bridge is a real subclass of each version's ILogger, made once per process (TensorRT
    keeps the first logger it is given), and its messages reach Python's logging."""
    folder = bindings(version, cache)
    paths = os.pathsep.join([str(folder), *sys.path])
    env = dict(os.environ, PYTHONPATH=paths, LD_LIBRARY_PATH=str(folder))
    proc = subprocess.run([sys.executable, "-c", LOGGER_PROBE], capture_output=True, text=True, env=env, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[('WARNING', 'from TensorRT'), ('DEBUG', 'detail')]"
