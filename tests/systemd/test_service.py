"""The service as a lab lives with it, under a real systemd: install.sh from the wheel (offline,
from a wheelhouse), the unit started with its user, sandbox and system-call filter, a frame dropped
into the watched folder measured and published to mosquitto, a restart that loses nothing, an
upgrade that keeps config, keys and state, a clean stop, and uninstall.

The machines this runs on do not boot systemd, so a Debian bookworm container does
(:mod:`tests.systemd.container`): systemd 252 is PID 1 there and applies the unit as it would on a
device. Two things differ from a device and are said plainly: the container's device cgroup is not
enforced (``DeviceAllow=`` cannot be shown to bite here; it is checked as a file in test_unit.py),
and there is no camera or GPU. The broker runs on the host's loopback, which the container shares.

The tests run in file order, as one device's life: each starts from where the previous one left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cellseg.build.bundle import generate_keypair
from tests.mqtt_broker import Broker, Subscriber
from tests.packaging import cache_folder, download_wheelhouse
from tests.systemd.container import Container, cached_rootfs, missing_tools

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREFIX = "cellseg/ci-scope"
INCOMING = "/var/lib/cellseg/incoming"
JETSON_WHEELS = "/wheelhouse-jetson"
L4T_36 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n"


@dataclass
class Device:
    container: Container
    broker: Broker
    sub: Subscriber
    frames: list[Path]
    install: subprocess.CompletedProcess[str]
    wheel: str

    def sh(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.container.run(*command, check=check)

    def install_sh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sh("/src/systemd/install.sh", *args, check=check)

    def drop(self, frame: Path) -> None:
        """What microscope software does: write the image into the watched folder (then it settles)."""
        target = self.container.path(f"{INCOMING}/{frame.name}")
        shutil.copy(frame, target)
        os.chmod(target, 0o644)

    def records(self) -> list[dict[str, object]]:
        return [json.loads(p) for p in self.sub.payloads(f"{PREFIX}/measurement")]

    def measured(self, names: list[str], timeout: float) -> bool:
        return self.sub.wait_for(lambda: {str(r["image"]).rsplit("/", 1)[-1] for r in self.records()} >= set(names),
                                 timeout=timeout)  # fmt: skip

    def unit(self, *props: str) -> dict[str, str]:
        out = self.sh("systemctl", "show", "cellseg.service", *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "booting a container needs root"
    missing = missing_tools()
    if missing:
        return f"needs {', '.join(missing)} (apt-get install debootstrap systemd-container)"
    return None


@pytest.fixture(scope="module")
def device(
    wheel: Path, wheelhouse: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Device]:
    reason = _prerequisites()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI provides all of it: a skip there would hide a broken install
        pytest.skip(reason)
    rootfs = cached_rootfs(cache_folder())
    work = tmp_path_factory.mktemp("device")
    # What an offline install on a Jetson resolves to: the same extras within the Jetson's pins.
    jetson = download_wheelhouse(wheel, work / "wheelhouse-jetson", REPO / "systemd" / "jetson-constraints.txt")
    broker = Broker(work)
    broker.start()
    container = Container(rootfs, work / "root", {REPO: "/src", wheelhouse: "/wheelhouse", jetson: JETSON_WHEELS})
    try:
        inside = container.run("python3", "-c", "import sys; print(sys.version_info[:2])").stdout.strip()
        if inside != str(tuple(sys.version_info[:2])):
            pytest.skip(f"the wheelhouse is for Python {sys.version_info[:2]}, the container has {inside}")
        # The lab's configuration, in place before the install (as configuration management does it).
        config = container.path("/etc/cellseg/cellseg.yaml")
        config.parent.mkdir(parents=True)
        settings = yaml.safe_load((REPO / "systemd" / "cellseg.yaml").read_text())
        settings["device_id"] = "ci-scope"
        settings["mqtt"].update(host="127.0.0.1", port=broker.port)
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
        started = time.monotonic()
        install = container.run("/src/systemd/install.sh", "--wheel", f"/wheelhouse/{wheel.name}",
                                "--wheelhouse", "/wheelhouse", check=False)  # fmt: skip
        print(f"install.sh took {time.monotonic() - started:.1f} s")
        frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))
        yield Device(container, broker, sub, frames, install, wheel.name)
        sub.close()
    finally:
        container.poweroff()
        broker.stop()


def test_install_starts_the_service_and_its_doctor_finds_nothing_wrong(device: Device) -> None:
    assert device.install.returncode == 0, device.install.stdout[-4000:] + device.install.stderr[-4000:]
    assert "cellseg is installed and measuring" in device.install.stdout
    assert device.unit("ActiveState", "UnitFileState") == {"ActiveState": "active", "UnitFileState": "enabled"}
    # The doctor ran inside the unit's sandbox, as the service user, and every check passed.
    assert "as user cellseg" in device.install.stdout
    assert "the service would run as configured" in device.install.stdout
    # The shipped model became the first engine slot, owned by the service.
    active = device.sh("readlink", "/var/lib/cellseg/engines/active").stdout.strip()
    assert active.startswith("slots/") and active.endswith(tuple("0123456789abcdef"))
    assert device.sh("stat", "-c", "%U", "/var/lib/cellseg/engines/" + active).stdout.strip() == "cellseg"
    # The daemon runs as cellseg, not root, under the filter (Seccomp: 2 is filter mode).
    pid = device.unit("MainPID")["MainPID"]
    fields = dict(line.split(":", 1) for line in device.sh("cat", f"/proc/{pid}/status").stdout.splitlines())
    assert fields["Seccomp"].strip() == "2" and fields["NoNewPrivs"].strip() == "1", fields
    uid = fields["Uid"].split()[0]
    assert device.sh("id", "-u", "cellseg").stdout.strip() == uid


def test_a_dropped_frame_is_measured_and_published_within_60_s(device: Device) -> None:
    frame = device.frames[0]
    started = time.monotonic()
    device.drop(frame)
    assert device.measured([frame.name], timeout=60), device.sh("journalctl", "-u", "cellseg", "-n", "40").stdout
    print(f"dropped frame published after {time.monotonic() - started:.1f} s")
    record = device.records()[-1]
    assert record["count"] == 68 and record["seq"] == 1  # what the shipped model finds in t01, first measurement
    assert device.sub.payloads(f"{PREFIX}/availability")[-1] == b"online"
    assert device.sub.payloads(f"{PREFIX}/count")[-1] == b"68"


def test_a_restart_while_measuring_loses_nothing(device: Device) -> None:
    first, second = device.frames[1:4], device.frames[4:8]
    for frame in first:
        device.drop(frame)
    assert device.sub.wait_for(lambda: len(device.records()) >= 2, timeout=60)  # measuring has begun
    for frame in second:  # these are still settling (1 s) when the restart comes: surely unmeasured
        device.drop(frame)
    device.sh("systemctl", "restart", "cellseg")
    batch = first + second
    assert device.measured([f.name for f in batch], timeout=120), device.sh("journalctl", "-u", "cellseg").stdout
    time.sleep(2.0)  # a duplicate would show now
    records = device.records()
    seqs = sorted({int(str(r["seq"])) for r in records})
    assert seqs == list(range(1, len(device.frames[:8]) + 1)), seqs  # each frame once, no gap
    names = [str(r["image"]).rsplit("/", 1)[-1] for r in records]
    assert sorted(set(names)) == [f.name for f in device.frames[:8]]
    assert device.unit("NRestarts")["NRestarts"] == "0"  # restarted by us, never by a crash


def test_predict_and_doctor_run_inside_the_units_sandbox(device: Device) -> None:
    frame = f"{INCOMING}/{device.frames[0].name}"
    proc = device.install_sh("--as-service", "/usr/local/bin/cellseg", "predict", frame, "--json")
    assert json.loads(proc.stdout)["count"] == 68
    assert "error" not in proc.stderr.lower(), proc.stderr
    doctor = device.install_sh("--doctor")
    assert doctor.returncode == 0 and "as user cellseg" in doctor.stdout, doctor.stdout
    # The sandbox is real: outside its state folder the file system is read-only to the service.
    touch = device.install_sh("--as-service", "/usr/bin/touch", "/usr/local/x", check=False)
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr


def test_an_upgrade_keeps_configuration_keys_engine_and_measurements(device: Device) -> None:
    config = device.container.path("/etc/cellseg/cellseg.yaml").read_bytes()
    key = device.container.path("/etc/cellseg/trusted-keys/lab.pub")
    _, public = generate_keypair(device.container.root.parent / "keys" / "lab")
    shutil.copy(public, key)
    active = device.sh("readlink", "/var/lib/cellseg/engines/active").stdout
    before = len(device.records())
    upgrade = device.install_sh("--wheel", f"/wheelhouse/{device.wheel}", "--wheelhouse", "/wheelhouse", check=False)
    assert upgrade.returncode == 0, upgrade.stdout[-3000:] + upgrade.stderr[-3000:]
    assert "cellseg is upgraded and measuring" in upgrade.stdout
    assert device.container.path("/etc/cellseg/cellseg.yaml").read_bytes() == config
    assert device.container.path("/etc/cellseg/cellseg.yaml.dist").is_file()  # the new default, beside it
    assert key.read_bytes() == public.read_bytes()
    assert device.sh("readlink", "/var/lib/cellseg/engines/active").stdout == active
    assert "already the active engine" in upgrade.stdout
    # Sequence numbers go on from the spool: the state survived.
    frame = device.frames[8]
    device.drop(frame)
    assert device.measured([frame.name], timeout=60)
    assert int(str(device.records()[-1]["seq"])) == before + 1


def test_stop_is_clean(device: Device) -> None:
    device.sh("systemctl", "stop", "cellseg")
    state = device.unit("ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0", "ExecMainCode": "1"}
    assert device.sub.wait_for(lambda: device.sub.payloads(f"{PREFIX}/availability")[-1:] == [b"offline"])
    journal = device.sh("journalctl", "-u", "cellseg", "--no-pager").stdout
    assert "Traceback" not in journal and "SIGSYS" not in journal, journal[-3000:]


def test_uninstall_keeps_measurements_and_purge_removes_everything(device: Device) -> None:
    removed = device.install_sh("--uninstall")
    assert "kept /etc/cellseg/cellseg.yaml" in removed.stdout
    for gone in ("/etc/systemd/system/cellseg.service", "/opt/cellseg", "/usr/local/bin/cellseg"):
        assert not device.container.path(gone).exists(), gone
    for kept in ("/etc/cellseg/cellseg.yaml", "/etc/cellseg/trusted-keys/lab.pub", "/var/lib/cellseg/spool.sqlite"):
        assert device.container.path(kept).exists(), kept
    purged = device.install_sh("--uninstall", "--purge")
    assert "removed cellseg, its configuration, state, spool and user" in purged.stdout
    assert not device.container.path("/etc/cellseg").exists() and not device.container.path("/var/lib/cellseg").exists()
    assert device.sh("id", "cellseg", check=False).returncode != 0


def test_a_jetpack_5_jetson_is_refused_before_anything_is_installed(device: Device) -> None:
    release = device.container.path("/etc/nv_tegra_release")
    release.write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n")
    try:
        refused = device.install_sh(
            "--wheel", f"/wheelhouse/{device.wheel}", "--wheelhouse", "/wheelhouse", check=False
        )
    finally:
        release.unlink()
    assert refused.returncode == 1
    assert "L4T R35 (JetPack 5 or older: Python 3.8, TensorRT 8.5), and cellseg needs JetPack 6" in refused.stderr
    assert not device.container.path("/opt/cellseg").exists() and device.sh("id", "cellseg", check=False).returncode


def test_on_a_jetpack_6_jetson_the_install_keeps_numpy_below_2_and_defaults_to_tensorrt(device: Device) -> None:
    """install.sh's Jetson branch, on this x86 container made to look like L4T R36 (only the
    release file: no GPU, no JetPack libraries). With no --extras it installs the TensorRT backend
    (``edge,trt``), which needs pycuda, built on a Jetson against its CUDA: offline without a
    pycuda wheel it stops there, saying so. With ``--extras edge,cpu`` it installs, and JetPack's
    pins hold: the venv gets numpy 1.x (JetPack's OpenCV and TensorRT are built for numpy 1)
    where the same install on a PC gets numpy 2, and the model runs in it."""
    release = device.container.path("/etc/nv_tegra_release")
    release.write_text(L4T_36)
    wheel = f"{JETSON_WHEELS}/{device.wheel}"
    try:
        default = device.install_sh("--wheel", wheel, "--wheelhouse", JETSON_WHEELS, "--no-start", check=False)
        assert default.returncode != 0
        assert f"installing {device.wheel} [edge,trt]" in default.stdout
        assert "pycuda" in default.stderr
        cpu = device.install_sh("--wheel", wheel, "--wheelhouse", JETSON_WHEELS, "--extras", "edge,cpu", "--no-start",
                                check=False)  # fmt: skip
        assert cpu.returncode == 0, cpu.stdout[-3000:] + cpu.stderr[-3000:]
        venv = "/opt/cellseg/venv/bin/python"
        numpy = device.sh(venv, "-c", "import numpy; print(numpy.__version__)").stdout.strip()
        assert numpy.startswith("1."), numpy
        frame = f"/src/samples/{sorted(p.name for p in (REPO / 'samples').glob('*.png'))[0]}"
        predicted = device.sh("/usr/local/bin/cellseg", "predict", frame, "--json")
        assert json.loads(predicted.stdout)["count"] > 0
    finally:
        release.unlink()
        device.install_sh("--uninstall", "--purge", check=False)
