"""The systemd unit: verified clean (any warning fails: systemd-analyze exits 0 on typos) and hardened."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "cellseg.service"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def _unit_with_real_binary(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists; the installed path is /usr/local/bin/cellseg.
    binary = shutil.which("cellseg")
    assert binary is not None, "the cellseg command is not installed"
    unit = tmp_path / "cellseg.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/cellseg", binary))
    return unit


def test_unit_verifies_without_a_single_warning(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(_unit_with_real_binary(tmp_path))],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_a_typo_would_be_caught(tmp_path: Path) -> None:
    unit = _unit_with_real_binary(tmp_path)
    unit.write_text(unit.read_text().replace("WatchdogSec=60", "WatchdogSecs=60"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert "WatchdogSecs" in proc.stderr  # the check above would fail on this


def test_exposure_is_at_most_3(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(_unit_with_real_binary(tmp_path))],
                          capture_output=True, text=True, check=False)  # fmt: skip
    match = re.search(r"Overall exposure level for cellseg.service: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    assert float(match.group(1)) <= 3.0


def test_notify_service_with_a_watchdog() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=60", "Restart=always", "User=cellseg", "StateDirectory=cellseg"):
        assert line in text.splitlines()


def test_install_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(REPO / "systemd" / "install.sh")], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
