"""The wheel as users get it: built from the checkout, its dependencies as a wheelhouse (the
offline install an air-gapped lab makes), and a fresh virtual environment installed from both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

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


def download_wheelhouse(wheel: Path, out: Path) -> Path:
    """Every dependency of the device extras, as wheels for this Python (and the wheel itself)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(out),
                    f"{wheel}[{DEVICE_EXTRAS}]"], check=True, timeout=900)  # fmt: skip
    return out


def make_venv(where: Path, wheel: Path, wheelhouse: Path) -> Path:
    """A fresh venv with the wheel installed offline (no index), without ``-e``; its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    pip = where / "bin" / "pip"
    subprocess.run([str(pip), "install", "--quiet", "--no-index", "--find-links", str(wheelhouse),
                    f"{wheel}[{DEVICE_EXTRAS}]"], check=True, timeout=900)  # fmt: skip
    return where / "bin"


def package_dirs() -> dict[str, str]:
    """pyproject's package -> source folder mapping (``cellseg.edge`` -> ``edge``)."""
    with open(REPO / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    return dict(setuptools["package-dir"])
