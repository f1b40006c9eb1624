"""The wheel as users get it: built from the checkout, its dependencies as a wheelhouse (the
offline install an air-gapped lab makes), and a fresh virtual environment installed from both;
and the other wheels tests fetch once into their cache (TensorRT's bindings, NVRTC)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_EXTRAS = "edge,cpu"


def build_wheel(out: Path) -> Path:
    """``pip wheel`` of the checkout, as install.sh does it (PEP 517, isolated build)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(REPO)],
                   check=True, timeout=600)  # fmt: skip
    wheels = sorted(out.glob("cellseg-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one cellseg wheel in {out}, found {wheels}")
    return wheels[0]


def download_wheelhouse(wheel: Path, out: Path, constraints: Path | None = None) -> Path:
    """Every dependency of the device extras, as wheels for this Python (and the wheel itself),
    resolved within ``constraints`` when given (a Jetson's: ``systemd/jetson-constraints.txt``)."""
    options = ["--constraint", str(constraints)] if constraints else []
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", *options, "--dest",
                    str(out), f"{wheel}[{DEVICE_EXTRAS}]"], check=True, timeout=900)  # fmt: skip
    return out


def make_venv(where: Path, wheel: Path, wheelhouse: Path) -> Path:
    """A fresh venv with the wheel installed offline (no index), without ``-e``; its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    pip = where / "bin" / "pip"
    subprocess.run([str(pip), "install", "--quiet", "--no-index", "--find-links", str(wheelhouse),
                    f"{wheel}[{DEVICE_EXTRAS}]"], check=True, timeout=900)  # fmt: skip
    return where / "bin"


def cache_folder() -> Path:
    """Where tests keep what they fetch or build once (a Debian root file system, wheels):
    ``$CELLSEG_TEST_CACHE``, else ``~/.cache/cellseg-tests``."""
    return Path(os.environ.get("CELLSEG_TEST_CACHE", Path.home() / ".cache" / "cellseg-tests"))


def unpacked_wheel(requirement: str, where: Path, *pip_options: str) -> Path:
    """The one wheel ``requirement`` names, downloaded (no dependencies) and unpacked into ``where``
    once; later calls find it there."""
    done = where / ".unpacked"
    if not done.exists():
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        subprocess.run([*command, *pip_options, "--dest", str(where / "wheel"), requirement], check=True, timeout=600)
        (wheel,) = (where / "wheel").glob("*.whl")
        zipfile.ZipFile(wheel).extractall(where)
        done.touch()
    return where


def package_dirs() -> dict[str, str]:
    """pyproject's package -> source folder mapping (``cellseg.edge`` -> ``edge``)."""
    import tomllib  # Python 3.11 and later; the JetPack lane (3.10) imports this module for the rest

    with open(REPO / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    return dict(setuptools["package-dir"])


def unpacked_sdist(name: str, version: str, where: Path, index: str = "https://pypi.org/simple") -> Path:
    """The source distribution of ``name`` ``version``, fetched once from the index's JSON API
    (PEP 691), checked against the sha256 the index gives and unpacked; the source folder.

    Not ``pip download``: for an sdist pip prepares metadata, which means a build environment
    and, for a CUDA package, a build that cannot run here."""
    import hashlib
    import json
    import tarfile
    import urllib.request

    folder = where / f"{name}-{version}"
    if (where / ".unpacked").exists():
        return folder
    request = urllib.request.Request(f"{index}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    wanted = f"{name}-{version}.tar.gz"
    (entry,) = [f for f in files if f["filename"] == wanted] or [None]
    if entry is None:
        raise RuntimeError(f"{index} has no {wanted}")
    with urllib.request.urlopen(entry["url"], timeout=300) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
        raise RuntimeError(f"{wanted} does not match the sha256 the index gives")
    where.mkdir(parents=True, exist_ok=True)
    archive = where / wanted
    archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        tar.extractall(where, filter="data")
    (where / ".unpacked").touch()
    return folder
