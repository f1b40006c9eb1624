"""`cellseg doctor` as an admin runs it: a real mosquitto, the shipped model installed as a slot,
real 16-bit frames in the watched folder; then each fault the issue names, one at a time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cellseg.build.bundle import generate_keypair
from cellseg.edge.tools.doctor import LOW_FREE_MB
from tests.conftest import SHIPPED_MODEL
from tests.mqtt_broker import Broker

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="mosquitto is not installed")


@dataclass
class Device:
    """A device's configuration on disk, as install.sh leaves it."""

    root: Path
    broker: Broker
    settings: dict[str, Any]

    @property
    def config(self) -> Path:
        path = self.root / "cellseg.yaml"
        path.write_text(yaml.safe_dump(self.settings))
        return path

    @property
    def state(self) -> Path:
        return Path(self.settings["state_dir"])


def _cellseg(*args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [*(wrap or []), sys.executable, "-m", "cellseg", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _doctor(device: Device, wrap: list[str] | None = None) -> tuple[int, dict[str, dict[str, str]]]:
    proc = _cellseg("doctor", "--config", str(device.config), "--json", wrap=wrap)
    report = json.loads(proc.stdout)
    assert report["ok"] == (proc.returncode == 0), proc.stdout
    return proc.returncode, {c["name"]: c for c in report["checks"]}


@pytest.fixture
def device(tmp_path: Path, data_root: Path) -> Iterator[Device]:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copy(data_root / "t98g_timelapse" / "frames" / "20180101ef002xy01t01.tif", incoming)
    broker = Broker(tmp_path)
    broker.start()
    settings = {
        "device_id": "doc-1",
        "state_dir": str(tmp_path / "state"),
        "source": {"kind": "folder", "path": str(incoming), "pattern": "*.tif"},
        "mqtt": {"host": broker.host, "port": broker.port},
    }
    dev = Device(tmp_path, broker, settings)
    installed = _cellseg("install-model", "--config", str(dev.config))
    assert installed.returncode == 0 and "now the active engine" in installed.stdout, installed.stderr
    yield dev
    dev.broker.stop()


def test_a_healthy_device_passes_every_check(device: Device) -> None:
    code, checks = _doctor(device)
    assert code == 0
    for name in ("python", "packages", "config", "runtimes", "engine", "slot", "source", "broker"):
        assert checks[name]["status"] == "ok", checks[name]
    # The state check also judges the free space of whatever disk the test runs on: a CI box with under
    # a GiB free is warned about, rightly, so the expected verdict follows the same measurement.
    free_mb = shutil.disk_usage(device.root / "state").free / 2**20
    assert checks["state"]["status"] == ("ok" if free_mb >= LOW_FREE_MB else "warn"), checks["state"]
    assert "is writable" in checks["state"]["detail"]
    # The slot's reference frame is the first sample frame, on which the shipped model finds 56 cells.
    assert "self-test 56 cells (expected 56)" in checks["engine"]["detail"]
    assert "every file matches its sha256" in checks["slot"]["detail"]
    assert "20180101ef002xy01t01.tif, reads (1024x1022, uint16)" in checks["source"]["detail"]
    assert checks["clock"]["status"] in ("ok", "warn")  # warn: no NTP daemon on a test machine
    # The text report names every check and ends with the verdict.
    text = _cellseg("doctor", "--config", str(device.config))
    assert text.returncode == 0 and text.stdout.rstrip().endswith("the service would run as configured")


def _broker_down(device: Device) -> None:
    device.broker.stop()


def _wrong_password(device: Device) -> None:
    device.broker.stop()
    workdir = device.root / "secured"
    workdir.mkdir()
    device.broker = Broker(workdir, passwords={"lab": "right"})
    device.broker.start()
    (device.root / "pw").write_text("wrong\n")
    device.settings["mqtt"] = {"host": device.broker.host, "port": device.broker.port, "username": "lab",
                               "password": {"file": str(device.root / "pw")}}  # fmt: skip


def _truncated_slot_model(device: Device) -> None:
    model = device.state / "engines" / "active" / "model.onnx"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])


def _unreadable_model_and_no_slot(device: Device) -> None:
    shutil.rmtree(device.state / "engines")
    broken = device.root / "broken.onnx"
    broken.write_bytes(SHIPPED_MODEL.read_bytes()[:100_000])
    device.settings["model"] = str(broken)


# The slot holds the shipped model; _truncated_slot_model keeps its first half.
_HALF_OF_THE_SHIPPED_MODEL = (
    f"{SHIPPED_MODEL.stat().st_size // 2} bytes, the manifest says {SHIPPED_MODEL.stat().st_size}"
)


def _missing_folder(device: Device) -> None:
    device.settings["source"]["path"] = str(device.root / "nowhere")


def _bad_config(device: Device) -> None:
    device.settings["mqtt"]["prot"] = 1883


@pytest.mark.parametrize(
    ("fault", "check", "detail", "fix"),
    [
        (_broker_down, "broker", "Connection refused", "start the broker at 127.0.0.1:"),
        (_wrong_password, "broker", "refused the connection: Not authorized", "check mqtt.username"),
        (_truncated_slot_model, "slot", _HALF_OF_THE_SHIPPED_MODEL, "install-model --config"),
        (_unreadable_model_and_no_slot, "engine", "ONNX Runtime cannot load it", "cellseg install-model --config"),
        (_missing_folder, "source", "does not exist", "mkdir -p"),
        (_bad_config, "config", "mqtt.prot: Extra inputs are not permitted", "cellseg validate-config"),
    ],
    ids=["broker down", "wrong password", "damaged slot", "unreadable model", "no watched folder", "config typo"],
)
def test_each_fault_is_named_with_its_fix_and_fails_the_run(
    device: Device, fault: Callable[[Device], None], check: str, detail: str, fix: str
) -> None:
    fault(device)
    code, checks = _doctor(device)
    assert code == 1
    assert checks[check]["status"] == "fail", checks[check]
    assert detail in checks[check]["detail"]
    assert fix in checks[check]["fix"]
    failed = [name for name, c in checks.items() if c["status"] == "fail"]
    assert failed == [check], f"only {check} should fail, not {failed}"


def test_a_damaged_slot_leaves_the_fallback_running_and_says_so(device: Device) -> None:
    _truncated_slot_model(device)
    _, checks = _doctor(device)
    assert checks["engine"]["status"] == "warn"
    assert "cellseg-usiigaci-yolo11n-seg.onnx" in checks["engine"]["detail"]  # the shipped fallback runs
    assert "did not load" in checks["engine"]["detail"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_a_read_only_state_folder_is_named_with_the_units_way_out(device: Device) -> None:
    # What a state_dir outside /var/lib/cellseg looks like under the unit's ProtectSystem=strict.
    state = str(device.state)
    wrap = ["unshare", "--mount", "sh", "-c",
            f'mount --bind "{state}" "{state}" && mount -o remount,bind,ro "{state}" && exec "$@"', "sh"]  # fmt: skip
    code, checks = _doctor(device, wrap=wrap)
    assert code == 1
    assert checks["state"]["status"] == "fail"
    assert "Read-only file system" in checks["state"]["detail"]
    assert f"ReadWritePaths={state}" in checks["state"]["fix"]


def test_a_flashed_slot_is_checked_against_the_trusted_keys(
    device: Device, bundles: dict[str, Path], signing_keys: tuple[Path, Path]
) -> None:
    device.settings["flash"] = {"trusted_keys": [str(signing_keys[1])]}
    flashed = _cellseg("flash", str(bundles["fp32"]), "--config", str(device.config))
    assert flashed.returncode == 0, flashed.stderr
    code, checks = _doctor(device)
    assert code == 0 and "signed by trusted key" in checks["slot"]["detail"]
    _, other = generate_keypair(device.root / "keys" / "new-lab-key")
    device.settings["flash"] = {"trusted_keys": [str(other)]}  # the lab replaced its key
    code, checks = _doctor(device)
    assert code == 1 and "which this device does not trust" in checks["slot"]["detail"]
    assert "flash.trusted_keys" in checks["slot"]["fix"]
