"""bench/gpu_check.py, ready for the day a GPU is lent: prepared here from real frames, then run
with the kernels on the CPU emulation (the GPU run swaps only the runner), with and without
OpenCV (a bare GPU machine may lack it), and against a damaged reference, which it must refuse."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
WITHOUT_OPENCV = (
    "import builtins, runpy, sys\n"
    "real = builtins.__import__\n"
    "def guard(name, *a, **k):\n"
    "    if name.split('.')[0] in ('cv2', 'onnxruntime'):\n"
    "        raise ImportError('not on this machine: ' + name)\n"
    "    return real(name, *a, **k)\n"
    "builtins.__import__ = guard\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("g++") is None, reason="the emulation needs g++")]


@pytest.fixture(scope="module")
def inputs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check") / "inputs.npz"
    subprocess.run([sys.executable, str(SCRIPT), "prepare", "--out", str(out), "--frames", "2"], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    return out


def _run(inputs: Path, report: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    command = [*prefix, str(SCRIPT), "run", "--inputs", str(inputs), "--runner", "emulated", "--repeats", "1",
               "--json", str(report)]  # fmt: skip
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("opencv", [True, False], ids=["with OpenCV", "without OpenCV"])
def test_the_check_passes_on_the_emulated_kernels(inputs: Path, tmp_path: Path, opencv: bool) -> None:
    prefix = () if opencv else ("-c", WITHOUT_OPENCV)
    proc = _run(inputs, tmp_path / "report.json", *prefix)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and report["problems"] == []
    rows = report["rows"]
    assert [r["thresholds"] for r in rows] == ["shipped", "dense"] * 2
    assert all(r["pre_ms"] > 0 and r["post_ms"] > 0 for r in rows)
    assert min(r["cells"] for r in rows if r["thresholds"] == "dense") > 500  # the dense case is dense
    assert "all kernels match the numpy reference" in proc.stdout


def test_the_check_refuses_a_reference_the_kernels_do_not_match(inputs: Path, tmp_path: Path) -> None:
    z = dict(np.load(inputs))
    z["tensor0"] = z["tensor0"] + 0.1  # as if the preprocessing kernel were off by 25 levels
    z["shipped1_scores"] = z["shipped1_scores"][::-1].copy()
    damaged = tmp_path / "damaged.npz"
    np.savez_compressed(damaged, **z)
    proc = _run(damaged, tmp_path / "report.json")
    assert proc.returncode == 1
    problems = json.loads((tmp_path / "report.json").read_text())["problems"]
    assert any("preprocessing differs" in p for p in problems) and any("scores" in p for p in problems), problems
