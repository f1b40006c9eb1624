"""Runs gstreamer_checks.py (real GStreamer pipelines through PyGObject) in a separate pytest
process, so the system's PyGObject and GStreamer libraries never load into this one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_gstreamer_pipelines_in_their_own_process(data_root: Path) -> None:
    checks = Path(__file__).with_name("gstreamer_checks.py")
    env = dict(os.environ, CELLSEG_DATA=str(data_root))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(checks)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 passed" in done.stdout, done.stdout[-2000:]  # skipped would not do: CI installs GStreamer
