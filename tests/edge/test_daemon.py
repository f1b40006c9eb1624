"""The daemon as a lab runs it: `cellseg run` in its own process, a watched folder of real frames,
a real mosquitto, systemd's notify socket, SIGTERM and SIGKILL."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cellseg.edge.capture.acquisition import iso_time
from tests.conftest import SHIPPED_MODEL
from tests.mqtt_broker import Broker, Subscriber
from tests.notify_socket import NotifySocket

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="mosquitto is not installed"),
]
PREFIX = "cellseg/scope-7"


@pytest.fixture
def frames(data_root: Path, tmp_path: Path) -> Path:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for tif in sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif")):
        shutil.copy(tif, incoming / tif.name)
    assert len(list(incoming.iterdir())) == 12
    return incoming


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


# The T98G frames' acquisition times, from their names: frame tNN every 10.2 min.
T98G_TIMES = {"pattern": r"t(?P<index>\d+)\.tif$", "interval_s": 612.0, "start": "2018-01-01T09:00:00+01:00"}


def _config(tmp_path: Path, incoming: Path, broker: Broker, **source: object) -> Path:
    path = tmp_path / "cellseg.yaml"
    path.write_text(yaml.safe_dump({
        "device_id": "scope-7",
        "model": str(SHIPPED_MODEL),
        "state_dir": str(tmp_path / "state"),
        "source": {"kind": "folder", "path": str(incoming), "pattern": "*.tif", **source},
        "measurement": {"pixel_size_um": 0.87},
        "mqtt": {"host": broker.host, "port": broker.port},
    }))  # fmt: skip
    return path


def _start(config: Path, tmp_path: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="10000000")
    return subprocess.Popen([sys.executable, "-m", "cellseg", "run", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _stop(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Stop a running daemon as systemd does (SIGTERM); it must exit with status 0."""
    assert proc.poll() is None, "the daemon ended before it was asked to"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=timeout) == 0


def _ensure_dead(proc: subprocess.Popen[str]) -> None:
    """After a failed test: no daemon left running."""
    if proc.poll() is None:
        proc.kill()


def _seqs(sub: Subscriber) -> list[int]:
    return [json.loads(p)["seq"] for p in sub.payloads(f"{PREFIX}/measurement")]


def test_folder_of_12_frames_measured_published_and_stopped_cleanly(
    frames: Path, tmp_path: Path, notify: NotifySocket
) -> None:
    broker = Broker(tmp_path)
    broker.start()
    try:
        sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
        proc = _start(_config(tmp_path, frames, broker), tmp_path)
        try:
            assert sub.wait_for(lambda: len(_seqs(sub)) == 12, timeout=120), proc.stderr
            _stop(proc)
        finally:
            _ensure_dead(proc)
        time.sleep(0.5)
        seen = list(notify.lines)
        assert _seqs(sub) == list(range(1, 13))  # consecutive, each once
        records = [json.loads(p) for p in sub.payloads(f"{PREFIX}/measurement")]
        assert all(r["schema"] == 1 and r["count"] > 0 and 0 < r["confluence_pct"] < 100 for r in records)
        assert all("mean_um2" in r["areas"] for r in records)
        assert [Path(r["image"]).name for r in records] == sorted(p.name for p in frames.iterdir())
        assert sub.payloads(f"{PREFIX}/count")[-1] == str(records[-1]["count"]).encode()
        assert sub.payloads(f"{PREFIX}/availability")[0] == b"online"
        assert sub.wait_for(lambda: sub.payloads(f"{PREFIX}/availability")[-1:] == [b"offline"])
        state = json.loads(sub.payloads(f"{PREFIX}/state")[-1])
        assert state["measured"] == 12 and state["spool_depth"] == 0
        assert "READY=1" in seen and "WATCHDOG=1" in seen and "STOPPING=1" in seen
        # An admin reading the journal must be able to trust that a WARNING means something:
        # this healthy run logs nothing at WARNING or above (its level is INFO: the rest is there).
        log = proc.stderr.read() if proc.stderr else ""
        assert "INFO cellseg.edge.service.engine_keeper: engine: onnxruntime" in log
        assert not re.search(r"^(WARNING|ERROR|CRITICAL) ", log, re.MULTILINE), log
        sub.close()
    finally:
        broker.stop()


def test_killed_daemon_replays_its_spool_and_measures_no_file_twice(frames: Path, tmp_path: Path) -> None:
    broker = Broker(tmp_path)  # not running: everything stays in the spool
    config = _config(tmp_path, frames, broker, time_from_name=T98G_TIMES)
    spool_db = tmp_path / "state" / "spool.sqlite"

    def spooled() -> int:
        if not spool_db.exists():
            return 0
        db = sqlite3.connect(f"file:{spool_db}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        except sqlite3.OperationalError:  # the daemon created the file but not yet its tables
            return 0
        finally:
            db.close()

    proc = _start(config, tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and spooled() < 5:
        time.sleep(0.1)
    proc.kill()  # SIGKILL mid-run
    proc.wait(timeout=10)
    before = spooled()
    assert before >= 5

    broker.start()
    try:
        sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
        proc = _start(config, tmp_path)
        try:
            assert sub.wait_for(lambda: sorted(set(_seqs(sub))) == list(range(1, 13)), timeout=120), proc.stderr
            time.sleep(1.0)  # anything extra would show now
            _stop(proc)
        finally:
            _ensure_dead(proc)
        records = [json.loads(p) for p in sub.payloads(f"{PREFIX}/measurement")]
        assert sorted(r["seq"] for r in records) == list(range(1, 13))  # exactly once: no file measured twice
        assert [Path(r["image"]).name for r in sorted(records, key=lambda r: r["seq"])] == sorted(
            p.name for p in frames.iterdir()
        )
        # What was measured before the kill went out as the backlog.
        assert all(r.get("historical") for r in records if r["seq"] <= before)
        # Backlog or not, each measurement carries when its frame was taken, not when it was sent.
        for r in records:
            index = int(Path(r["image"]).stem[-2:])
            assert r["acquired_from"] == "file-name"
            assert r["acquired_at"] == iso_time(1514793600.0 + index * 612.0), r  # 08:00 UTC + index x 10.2 min
        sub.close()
    finally:
        broker.stop()


def test_a_backlog_under_a_slow_engine_is_measured_each_file_exactly_once(data_root: Path, tmp_path: Path) -> None:
    """Inference of 3 s per frame, 20 files waiting: before, a file still being measured was read
    again at the next poll of the folder (1.5 s later) and measured twice under a new number."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    sources = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))
    sources += sorted((data_root / "usiigaci" / "train").glob("set*/raw.tif"))[: 20 - len(sources)]
    for i, frame in enumerate(sources):
        shutil.copy(frame, incoming / f"{i:02d}-{frame.parent.name}-{frame.name}")
    assert len(list(incoming.iterdir())) == 20
    broker = Broker(tmp_path)
    broker.start()
    try:
        sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
        harness = Path(__file__).with_name("faulty_daemon.py")
        config = _config(tmp_path, incoming, broker)
        proc = subprocess.Popen([sys.executable, str(harness), "inference-slow", "0", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            assert sub.wait_for(lambda: len(_seqs(sub)) >= 20, timeout=180)
            time.sleep(4.0)  # one more slow frame's time: a second measurement would show now
            proc.terminate()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        records = [json.loads(p) for p in sub.payloads(f"{PREFIX}/measurement")]
        assert sorted(r["seq"] for r in records) == list(range(1, 21))
        assert sorted(Path(r["image"]).name for r in records) == sorted(p.name for p in incoming.iterdir())
        sub.close()
    finally:
        broker.stop()


@pytest.mark.parametrize("with_broker", [True, False])
def test_demo_prints_measurements_and_publishes_when_a_broker_answers(tmp_path: Path, with_broker: bool) -> None:
    broker = Broker(tmp_path)
    if with_broker:
        broker.start()
    try:
        sub = Subscriber(broker.host, broker.port, "cellseg/demo/#") if with_broker else None
        scratch = tmp_path / "scratch"  # the demo's temporary state goes here, and must go away
        scratch.mkdir()
        proc = subprocess.run(
            [sys.executable, "-m", "cellseg", "demo", "--broker", f"{broker.host}:{broker.port}",
             "--overlay", str(tmp_path / "overlays")],
            capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "TMPDIR": str(scratch)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert list(scratch.glob("cellseg-*")) == []
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [r["seq"] for r in lines] == [1, 2, 3] and all(r["count"] > 0 for r in lines)
        assert len(list((tmp_path / "overlays").glob("*.png"))) == 3
        if sub is not None:
            assert sub.wait_for(lambda: len(sub.payloads("cellseg/demo/measurement")) == 3)
            sub.close()
        else:
            assert "no MQTT broker answers" in proc.stderr
    finally:
        broker.stop()


def test_demo_can_announce_itself_to_home_assistant(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cellseg", "demo", "--broker", f"{broker.host}:{broker.port}", "--homeassistant",
             "--overlay", str(tmp_path / "overlays")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        # Home Assistant starting later finds the sensors: the discovery messages are retained.
        sub = Subscriber(broker.host, broker.port, "homeassistant/#")
        topics = {f"homeassistant/sensor/cellseg_demo/{key}/config"
                  for key in ("count", "confluence", "doubling_time", "passage_eta")}  # fmt: skip
        topics.add("homeassistant/binary_sensor/cellseg_demo/passage_due/config")
        assert sub.wait_for(lambda: {t for t, _, retained in sub.messages if retained} == topics), sub.messages
        sub.close()
    finally:
        broker.stop()


def test_commands_are_validated_and_answered_while_measuring_goes_on(data_root: Path, tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[:3]
    config = tmp_path / "cellseg.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "scope-7", "model": str(SHIPPED_MODEL), "state_dir": str(tmp_path / "state"),
        "source": {"kind": "images", "images": [str(p) for p in frames], "loop": True, "interval_s": 0.2},
        "mqtt": {"host": broker.host, "port": broker.port},
    }))  # fmt: skip
    sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
    proc = _start(config, tmp_path)
    try:
        assert sub.wait_for(lambda: len(_seqs(sub)) >= 2, timeout=60), proc.stderr
        cases = {
            "snapshot": b'{"id": "bad-json", "quality": ',
            "reboot": b'{"id": "r1"}',
            "flash": b'{"id": "f1", "url": "file:///x", "sha256": "00"}',
        }
        for name, payload in cases.items():
            sub.client.publish(f"{PREFIX}/cmd/{name}", payload, qos=1)
        sub.client.publish(f"{PREFIX}/cmd/snapshot", b'{"id": "wrong-type", "quality": "high"}', qos=1)
        sub.client.publish(f"{PREFIX}/cmd/snapshot", b'{"id": "huge", "pad": "' + b"x" * 70000 + b'"}', qos=1)
        sub.client.publish(f"{PREFIX}/cmd/snapshot", b"[1, 2]", qos=1)
        sub.client.publish(f"{PREFIX}/cmd/snapshot", b'{"id": "good", "quality": 70}', qos=1)

        def replies(name: str) -> list[dict[str, object]]:
            return [json.loads(p) for p in sub.payloads(f"{PREFIX}/cmd/{name}/result")]

        assert sub.wait_for(lambda: len(replies("snapshot")) == 5 and replies("reboot") and replies("flash"), 30)
        snap = {r["id"]: r for r in replies("snapshot")}
        errors = [r["error"] for r in replies("snapshot") if not r["ok"]]
        assert any("not JSON" in str(e) for e in errors)
        assert any("payload of" in str(e) and "exceeds" in str(e) for e in errors)
        assert any("must be a JSON object" in str(e) for e in errors)
        assert "quality" in str(snap["wrong-type"]["error"]) and snap["wrong-type"]["ok"] is False
        assert snap["good"]["ok"] is True
        assert "unknown command 'reboot'" in str(replies("reboot")[0]["error"]) and replies("reboot")[0]["id"] == "r1"
        assert replies("flash")[0]["ok"] is False
        jpeg = sub.payloads(f"{PREFIX}/snapshot")
        assert len(jpeg) == 1 and jpeg[0][:2] == b"\xff\xd8"
        # Measuring went on throughout, with consecutive sequence numbers.
        count = len(_seqs(sub))
        assert sub.wait_for(lambda: len(_seqs(sub)) >= count + 2, timeout=30)
        assert _seqs(sub) == list(range(1, len(_seqs(sub)) + 1))
        _stop(proc)
    finally:
        _ensure_dead(proc)
        sub.close()
        broker.stop()


def test_sighup_reloads_the_config_and_a_broken_edit_keeps_the_old_one(data_root: Path, tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    frame = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[0]
    settings = {
        "device_id": "scope-7", "model": str(SHIPPED_MODEL), "state_dir": str(tmp_path / "state"),
        "source": {"kind": "images", "images": [str(frame)], "loop": True, "interval_s": 0.2},
        "mqtt": {"host": broker.host, "port": broker.port},
    }  # fmt: skip
    config = tmp_path / "cellseg.yaml"
    config.write_text(yaml.safe_dump(settings))
    sub = Subscriber(broker.host, broker.port, f"{PREFIX}/measurement")
    proc = _start(config, tmp_path)

    def counts() -> list[int]:
        return [json.loads(p)["count"] for p in sub.payloads(f"{PREFIX}/measurement")]

    try:
        assert sub.wait_for(lambda: len(counts()) >= 3, timeout=60), proc.stderr
        before = counts()[-1]
        config.write_text(yaml.safe_dump(settings | {"postprocess": {"conf": 0.9}}))
        proc.send_signal(signal.SIGHUP)
        assert sub.wait_for(lambda: counts()[-1] < before, timeout=60)
        after = counts()[-1]
        config.write_text("device_id: [broken\n")
        proc.send_signal(signal.SIGHUP)
        n = len(counts())
        assert sub.wait_for(lambda: len(counts()) >= n + 5, timeout=60)  # still measuring
        assert counts()[-1] == after  # with the configuration it had
        seqs = [json.loads(p)["seq"] for p in sub.payloads(f"{PREFIX}/measurement")]
        assert seqs == list(range(1, len(seqs) + 1))  # consecutive across both reloads
        _stop(proc)
        assert "reload refused, keeping the running configuration" in proc.stderr.read()
    finally:
        _ensure_dead(proc)
        sub.close()
        broker.stop()


def test_a_long_interval_keeps_the_watchdog_fed(data_root: Path, tmp_path: Path, notify: NotifySocket) -> None:
    """One measurement every 30 s under WatchdogSec=2 s: the pings must continue in between."""
    frame = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[0]
    config = tmp_path / "cellseg.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "scope-7", "model": str(SHIPPED_MODEL), "state_dir": str(tmp_path / "state"),
        "source": {"kind": "images", "images": [str(frame)], "loop": True, "interval_s": 30},
        "mqtt": {"enabled": False},
    }))  # fmt: skip
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="2000000")
    proc = subprocess.Popen([sys.executable, "-m", "cellseg", "run", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "READY=1" not in notify.lines:
            time.sleep(0.1)
        start = len(notify.lines)
        time.sleep(6)
        pings = notify.lines[start:].count("WATCHDOG=1")
        assert pings >= 6, f"{pings} watchdog pings in 6 s with a 2 s watchdog"
        _stop(proc)
    finally:
        _ensure_dead(proc)


def test_broker_restarted_three_times_while_the_daemon_measures_a_looped_folder(
    data_root: Path, tmp_path: Path
) -> None:
    """A few hundred real frames (the 12 t98g frames, looped); the broker goes away three times."""
    broker = Broker(tmp_path)
    broker.start()
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))
    config = tmp_path / "cellseg.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "scope-7", "model": str(SHIPPED_MODEL), "state_dir": str(tmp_path / "state"),
        "engine": {"threads": 1},
        "source": {"kind": "images", "images": [str(p) for p in frames], "loop": True},
        "mqtt": {"host": broker.host, "port": broker.port},
    }))  # fmt: skip
    sub = Subscriber(broker.host, broker.port, f"{PREFIX}/measurement")
    proc = _start(config, tmp_path)
    spool = tmp_path / "state" / "spool.sqlite"

    def newest_seq() -> int:
        try:
            with sqlite3.connect(spool) as db:
                row = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
            return int(row[0]) if row else 0
        except sqlite3.Error:
            return 0

    try:
        for round_ in range(3):
            assert sub.wait_for(lambda r=round_: len(set(_seqs(sub))) >= 60 * (r + 1), timeout=120), proc.stderr
            broker.stop()
            before = newest_seq()
            time.sleep(2.0)
            assert newest_seq() > before  # measuring goes on while the broker is away
            broker.start()
        assert sub.wait_for(lambda: len(set(_seqs(sub))) >= 300, timeout=180)
        _stop(proc, timeout=60)
        last = newest_seq()
        assert sub.wait_for(lambda: set(_seqs(sub)) == set(range(1, last + 1)), timeout=60), (
            f"missing {sorted(set(range(1, last + 1)) - set(_seqs(sub)))[:20]}"
        )
        records = [json.loads(p) for p in sub.payloads(f"{PREFIX}/measurement")]
        assert any(r.get("historical") for r in records)  # the backlog was marked as replayed
        assert last >= 300
    finally:
        _ensure_dead(proc)
        sub.close()
        broker.stop()
