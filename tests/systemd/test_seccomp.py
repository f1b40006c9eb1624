"""The daemon under the unit's own system-call filter, reproduced without systemd (seconds, on any
machine with Debian's python3-seccomp): the filter the unit shipped before killed ``import numpy``.

What is emulated: only the filter (resolved group by group by ``systemd-analyze syscall-filter``),
as root, with the host's paths. tests/systemd/test_service.py starts the unit for real, with its
user, sandbox and paths, under a real systemd.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_setup import folder_device
from tests.mqtt_broker import Broker, Subscriber

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "cellseg.service"
SYSTEM_PYTHON = "/usr/bin/python3"
EXEC = Path(__file__).with_name("seccomp_exec.py")
SIGSYS = -signal.SIGSYS


@pytest.fixture(scope="module")
def filtered() -> list[str]:
    """The command prefix that runs what follows under the unit's filter."""
    ok = (
        shutil.which("systemd-analyze")
        and Path(SYSTEM_PYTHON).exists()
        and subprocess.run([SYSTEM_PYTHON, "-c", "import seccomp"], capture_output=True, check=False).returncode == 0
    )
    if not ok:
        message = "needs systemd-analyze and Debian's python3-seccomp (apt-get install python3-seccomp)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs both: a missing one must not pass as a skip
        pytest.skip(message)
    return [SYSTEM_PYTHON, str(EXEC), str(UNIT), "--"]


def _without(unit: Path, key: str, tmp_path: Path) -> Path:
    variant = tmp_path / "variant.service"
    variant.write_text("\n".join(line for line in unit.read_text().splitlines() if not line.startswith(key + "=")))
    return variant


def _python(prefix: list[str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def test_the_filter_refuses_what_it_leaves_out_with_eperm(filtered: list[str]) -> None:
    proc = _python(filtered, "import os\ntry:\n os.sched_setaffinity(0, {0})\nexcept OSError as e: print(e.errno)")
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc  # EPERM, and the process lives on


def test_without_an_errno_the_same_filter_kills_import_numpy(filtered: list[str], tmp_path: Path) -> None:
    """Why the unit says SystemCallErrorNumber=EPERM: without it, any call outside the list is
    SIGSYS, and numpy's OpenBLAS calls mbind (in @resources) at import."""
    killing = [*filtered[:2], str(_without(UNIT, "SystemCallErrorNumber", tmp_path)), "--"]
    assert _python(killing, "print('alive')").returncode == 0  # the interpreter itself runs
    assert _python(killing, "import numpy").returncode == SIGSYS


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_predict_under_the_filter_finds_what_it_finds_without_it(
    filtered: list[str], data_root: Path, backend: str
) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino", reason="needs the openvino extra")
    frame = data_root / "t98g_timelapse" / "frames" / "20180101ef002xy01t03.tif"
    command = [sys.executable, "-m", "cellseg", "predict", str(frame), "--json", "--backend", backend]
    free = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    boxed = subprocess.run([*filtered, *command], capture_output=True, text=True, timeout=120, check=False)
    assert boxed.returncode == 0, boxed.stderr[-2000:]
    a, b = json.loads(free.stdout), json.loads(boxed.stdout)
    assert (a["count"], a["confluence_pct"]) == (b["count"], b["confluence_pct"]) and a["count"] > 0
    # Nothing complains on stderr: neither engine tries to pin threads (sched_setaffinity).
    assert "error" not in boxed.stderr.lower(), boxed.stderr


def test_the_daemon_measures_publishes_and_stops_under_the_filter(
    filtered: list[str], data_root: Path, tmp_path: Path
) -> None:
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[:3]
    broker = Broker(tmp_path)
    broker.start()
    config, _ = folder_device(tmp_path, broker, "sc-1", frames)
    try:
        sub = Subscriber(broker.host, broker.port, "cellseg/sc-1/#")
        cellseg = [*filtered, sys.executable, "-m", "cellseg"]
        installed = subprocess.run([*cellseg, "install-model", "--config", str(config)], capture_output=True,
                                   text=True, timeout=120, check=False)  # fmt: skip
        assert installed.returncode == 0, installed.stderr
        daemon = subprocess.Popen([*cellseg, "run", "--config", str(config)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            measured = lambda: sub.payloads("cellseg/sc-1/measurement")  # noqa: E731
            assert sub.wait_for(lambda: len(measured()) == 3, timeout=120)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0, daemon.stderr.read() if daemon.stderr else ""
        finally:
            if daemon.poll() is None:
                daemon.kill()
        records = [json.loads(p) for p in measured()]
        assert [Path(r["image"]).name for r in records] == [f.name for f in frames]
        doctor = subprocess.run([*cellseg, "doctor", "--config", str(config), "--json"], capture_output=True,
                                text=True, timeout=120, check=False)  # fmt: skip
        assert doctor.returncode == 0, doctor.stdout
        sub.close()
    finally:
        broker.stop()
