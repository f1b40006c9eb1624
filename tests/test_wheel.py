"""The wheel is the product: it holds every module and the shipped model, and it runs installed
into a fresh venv (no ``-e``, no index, no checkout on the path) from an unrelated directory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, SHIPPED_MODEL
from tests.packaging import REPO, make_venv, package_dirs

pytestmark = pytest.mark.slow

# Tracked files that stay out of the wheel on purpose: the training checkpoint (6 MB, workstation only).
NOT_SHIPPED = ("models/*.pt",)


def _tracked(folder: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "--", folder], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line]


def _wheel_path(source: str, mapping: dict[str, str]) -> str | None:
    """Where a source file lands in the wheel, by the longest matching package folder."""
    best = max((folder for folder in mapping.values() if source.startswith(folder + "/")), key=len, default=None)
    if best is None:
        return None
    package = next(p for p, folder in mapping.items() if folder == best)
    return package.replace(".", "/") + source[len(best) :]


def test_the_wheel_holds_every_tracked_file_of_every_package(wheel: Path) -> None:
    mapping = package_dirs()
    names = set(zipfile.ZipFile(wheel).namelist())
    expected, missing = 0, []
    for folder in sorted(set(mapping.values())):
        for source in _tracked(folder):
            if any(Path(source).match(pattern) for pattern in NOT_SHIPPED):
                assert _wheel_path(source, mapping) not in names, f"{source} must stay out of the wheel"
                continue
            target = _wheel_path(source, mapping)
            expected += 1
            if target not in names:
                missing.append(f"{source} (as {target})")
    assert not missing, (
        "missing from the wheel (add the package to pyproject's package-dir/packages/package-data): "
        + (", ".join(missing))
    )
    assert expected > 60  # the stage folders, the model and the samples were all walked


def test_a_python_folder_not_declared_as_a_package_is_caught(tmp_path: Path) -> None:
    """What the check above guards against: a new subpackage (like edge/capture once was) that
    pyproject does not list lands in no package at all."""
    mapping = {k: v for k, v in package_dirs().items() if k != "cellseg.edge.capture"}
    assert _wheel_path("edge/capture/files.py", mapping) == "cellseg/edge/capture/files.py"  # under cellseg.edge...
    names = {"cellseg/edge/service/daemon.py"}  # ...which setuptools does not walk into: the file is missing
    assert _wheel_path("edge/capture/files.py", mapping) not in names


def test_the_shipped_model_in_the_wheel_is_the_one_in_the_repository(wheel: Path) -> None:
    data = zipfile.ZipFile(wheel).read(f"cellseg/models/{SHIPPED_MODEL.name}")
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(SHIPPED_MODEL.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def venv_bin(wheel: Path, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield make_venv(tmp_path_factory.mktemp("venv") / "v", wheel, wheelhouse)


def test_installed_package_comes_from_the_venv_not_the_checkout(venv_bin: Path, tmp_path: Path) -> None:
    code = "import cellseg.edge.bundles.shipped as s; print(s.shipped_model()); print(s.sample_frames()[0])"
    out = subprocess.run([str(venv_bin / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    site = venv_bin.parent / "lib"
    assert all(Path(p).is_relative_to(site) and Path(p).is_file() for p in out), out


def test_demo_runs_from_an_unrelated_directory(venv_bin: Path, tmp_path: Path) -> None:
    proc = subprocess.run([str(venv_bin / "cellseg"), "demo", "--broker", "127.0.0.1:9"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    # The three shipped sample frames, each measured once, with what the shipped model finds there.
    assert [Path(r["image"]).name for r in records] == sorted(p.name for p in SAMPLES.glob("*.png"))
    assert [r["count"] for r in records] == [56, 38, 50]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == [
        p.with_suffix(".png").name for p in sorted(SAMPLES.glob("*.png"))
    ]


def test_predict_from_the_wheel_matches_the_checkout_on_a_real_16_bit_frame(
    venv_bin: Path, tmp_path: Path, data_root: Path
) -> None:
    from cellseg.edge.capture.imageio import read_image
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
    from cellseg.edge.pipeline.host import HostPipeline
    from cellseg.edge.pipeline.types import Frame

    frame = data_root / "t98g_timelapse" / "frames" / "20180101ef002xy01t05.tif"
    proc = subprocess.run([str(venv_bin / "cellseg"), "predict", str(frame), "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = json.loads(proc.stdout)
    with OnnxRuntimeEngine(SHIPPED_MODEL) as engine:
        here = HostPipeline(engine)(Frame(read_image(frame), source=str(frame))).measurement
    assert installed["count"] == here.count > 0
    assert installed["confluence_pct"] == pytest.approx(here.confluence_pct, abs=1e-3)


def test_a_jetsons_dependencies_resolve_to_binary_wheels(wheel: Path, tmp_path: Path) -> None:
    """What install.sh asks pip for on a Jetson (the 'edge' extra; OpenCV and TensorRT come from
    JetPack), under its constraints, as JetPack 6 needs it: wheels for aarch64, CPython 3.10,
    glibc 2.35 (Ubuntu 22.04), nothing to build there, numpy below 2. (pycuda, in 'trt', has no
    wheels and is built on the device against JetPack's CUDA.)"""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         # Every manylinux level glibc 2.35 runs: pip does not expand a given platform to older ones.
         *(f"--platform=manylinux_{v}_aarch64" for v in ("2_35", "2_28", "2_17")), "--platform=manylinux2014_aarch64",
         "--python-version", "3.10", "--implementation", "cp",
         "--constraint", str(REPO / "systemd" / "jetson-constraints.txt"), "--dest", str(tmp_path),
         f"{wheel}[edge]"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.glob("*.whl"))
    assert all(f.endswith(("-any.whl", "aarch64.whl")) for f in files), files
    (numpy,) = [f for f in files if f.startswith("numpy-")]
    assert numpy.startswith("numpy-1.") and "cp310" in numpy, numpy
    assert {f.split("-")[0].lower() for f in files} >= {"numpy", "pyyaml", "pydantic_core", "paho_mqtt", "cryptography"}
