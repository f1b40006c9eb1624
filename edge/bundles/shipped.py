"""What the package ships: the trained model and the sample frames, as package data.

They are found through :mod:`importlib.resources`, so the same lookup works in a checkout
(``pip install -e``), in an installed wheel and from any working directory. A wheel is always
installed unpacked, so the resources are plain files; anything else is reported, not guessed.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from cellseg.edge.errors import ModelError

SHIPPED_MODEL_NAME = "cellseg-usiigaci-yolo11n-seg.onnx"
MODEL_ENV = "CELLSEG_MODEL"


def shipped_model_path() -> Path:
    """Where the shipped ONNX model is in this installation (not checked: see shipped_model)."""
    return Path(str(resources.files("cellseg.models").joinpath(SHIPPED_MODEL_NAME)))


def shipped_model() -> Path:
    """The ONNX model shipped with this version of cellseg; ModelError when the install lacks it."""
    path = shipped_model_path()
    if not path.is_file():
        raise ModelError(f"{path.name} is missing from this installation of cellseg (looked in {path.parent}); "
                         "reinstall cellseg from its wheel")  # fmt: skip
    return path


def default_model() -> Path:
    """``$CELLSEG_MODEL``, else the shipped model: what commands run when given no model."""
    env = os.environ.get(MODEL_ENV)
    return Path(env) if env else shipped_model()


def sample_frames() -> list[Path]:
    """The shipped sample frames (8-bit PNGs of Usiigaci validation frames), in name order."""
    folder = Path(str(resources.files("cellseg.samples")))
    frames = sorted(folder.glob("*.png"))
    if not frames:
        raise ModelError(f"no sample frames in the installed package (looked in {folder}); reinstall cellseg")
    return frames
