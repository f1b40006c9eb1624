"""The systemd unit as a file: verified clean (any warning fails: systemd-analyze exits 0 on typos),
hardened no worse than before, and letting through what the device needs (GPU nodes, the Argus
socket). That it runs is shown by tests/systemd/test_seccomp.py (its filter, emulated) and
test_service.py (started by a real systemd)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cellseg.edge.device import GPU_DEVICE_NODES
from tests.systemd.seccomp_exec import service_lines

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "cellseg.service"
# `systemd-analyze security` exposure: 1.6 before the system-call filter was reworked, 1.4 since.
MAX_EXPOSURE = 1.4

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


def test_exposure_stays_at_its_level(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(_unit_with_real_binary(tmp_path))],
                          capture_output=True, text=True, check=False)  # fmt: skip
    match = re.search(r"Overall exposure level for cellseg.service: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


def test_notify_service_with_a_watchdog() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=60", "Restart=always", "User=cellseg", "StateDirectory=cellseg"):
        assert line in text.splitlines()


def test_install_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(REPO / "systemd" / "install.sh")], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_every_gpu_device_node_is_allowed() -> None:
    allowed = {v.split()[0] for v in service_lines(UNIT, "DeviceAllow") if v.split()[1:] == ["rw"]}
    assert set(GPU_DEVICE_NODES["jetson"]) <= allowed, set(GPU_DEVICE_NODES["jetson"]) - allowed
    # dGPU nodes by device group: /dev/nvidia0, nvidiactl (nvidia-frontend), nvidia-uvm*, MIG caps.
    assert {"char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps", "char-video4linux"} <= allowed
    assert service_lines(UNIT, "DevicePolicy") == ["closed"]


def test_calls_outside_the_filter_fail_with_an_error_instead_of_killing_the_daemon() -> None:
    assert service_lines(UNIT, "SystemCallFilter")[0] == "@system-service"
    assert service_lines(UNIT, "SystemCallErrorNumber") == ["EPERM"]


def test_csi_cameras_reach_the_argus_socket_and_cuda_reads_proc() -> None:
    assert service_lines(UNIT, "PrivateTmp") == ["yes"]
    assert "-/tmp/argus_socket" in service_lines(UNIT, "BindPaths")
    assert service_lines(UNIT, "ProcSubset") == []  # pid would hide /proc/driver/nvidia


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_install_script_passes_shellcheck() -> None:
    proc = subprocess.run(["shellcheck", str(REPO / "systemd" / "install.sh")], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout
