"""Make ultralytics run with no network at all: the training stage of an air-gapped lab.

ultralytics reaches for the network in several places: DNS probes on import, settings in the
user's home, a font download from GitHub on the first plot, run-time ``pip install`` of missing
packages, and pretrained-weight downloads. Each is switched off here, before ultralytics is
imported, and its settings are kept inside the run directory instead of ``~/.config``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from cellseg.edge.errors import DependencyError

# Fonts ultralytics asks for by name; any TrueType font with Latin glyphs serves for its plots.
_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def _bundled_font() -> Path:
    """A TrueType font that ships with matplotlib (an ultralytics dependency), so no download."""
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not font.is_file():
        raise DependencyError("matplotlib", "train", "offline plotting (DejaVuSans.ttf not found)")
    return font


def _install_fonts(config_dir: Path) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    font = _bundled_font()
    for name in _FONT_NAMES:
        target = config_dir / name
        if not target.exists():
            shutil.copyfile(font, target)


def import_ultralytics_offline(settings_dir: Path, threads: int | None = None) -> Any:
    """Import ultralytics with every network path switched off and settings under ``settings_dir``.

    Args:
        settings_dir: folder for ultralytics' settings and fonts (e.g. ``<run>/.ultralytics``).
        threads: torch CPU threads for training; ultralytics' default is ``cpu_count - 1``,
            which is a single thread on a 2-core machine (half the speed).

    Returns:
        The ``ultralytics`` module.
    """
    settings_dir = Path(settings_dir).resolve()
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ.setdefault("YOLO_VERBOSE", "true")
    already_imported = "ultralytics" in sys.modules
    if not already_imported:
        os.environ["YOLO_CONFIG_DIR"] = str(settings_dir)
    try:
        import ultralytics
        import ultralytics.utils as uutils
        from ultralytics.utils import torch_utils
    except ImportError as e:
        raise DependencyError("ultralytics", "train", "training, evaluation and export") from e
    # ultralytics fixes its config folder at first import; when that already happened in this
    # process (tests, notebooks) the fonts go where it looks.
    _install_fonts(Path(uutils.USER_CONFIG_DIR))
    uutils.SETTINGS["sync"] = False
    if threads is not None:
        # select_device() reads this module global when it sets torch's thread count.
        setattr(torch_utils, "NUM_THREADS", max(1, threads))  # noqa: B010
    return ultralytics
