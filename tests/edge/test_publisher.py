"""Publishing through a real mosquitto broker: nothing lost across outages, restarts and refusals."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellseg import __version__
from cellseg.edge.config import MqttConfig, Secret, TlsConfig
from cellseg.edge.service.contract import CONFLUENCE, COUNT
from cellseg.edge.service.publisher import MqttPublisher
from cellseg.edge.service.spool import Spool
from tests.mqtt_broker import Broker, Subscriber

PREFIX = "cellseg/test-scope"
MEASUREMENT = f"{PREFIX}/measurement"

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="mosquitto is not installed")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


def _publisher(broker: Broker, spool: Spool, prefix: str = PREFIX, **mqtt: object) -> MqttPublisher:
    config = MqttConfig(host=broker.host, port=broker.port, **mqtt)  # type: ignore[arg-type]
    return MqttPublisher(config, prefix, "cellseg-test", spool)


def _measure(spool: Spool, publisher: MqttPublisher, seq: int) -> None:
    spool.put(MEASUREMENT, json.dumps({"schema": 1, "seq": seq}).encode())
    publisher.notify_spooled()


def _seqs(sub: Subscriber) -> list[int]:
    return [json.loads(p)["seq"] for p in sub.payloads(MEASUREMENT)]


def test_measurements_availability_and_retained_values(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
    spool = Spool(tmp_path / "spool.sqlite")
    pub = _publisher(broker, spool)
    pub.start()
    assert pub.connected.wait(10)
    for seq in range(12):
        _measure(spool, pub, seq)
    pub.publish_retained(COUNT, "42")
    assert sub.wait_for(lambda: len(_seqs(sub)) == 12)
    assert _seqs(sub) == list(range(12))
    assert sub.wait_for(lambda: spool.depth() == 0)
    pub.stop()
    assert sub.wait_for(lambda: sub.payloads(f"{PREFIX}/availability")[-1:] == [b"offline"])
    assert sub.payloads(f"{PREFIX}/availability")[0] == b"online"
    sub.close()
    # A subscriber arriving later gets the retained latest values.
    late = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
    assert late.wait_for(lambda: late.payloads(f"{PREFIX}/count") == [b"42"])
    assert late.payloads(f"{PREFIX}/availability") == [b"offline"]
    late.close()


def test_backlog_from_before_the_broker_came_up_is_sent_as_historical(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    spool = Spool(tmp_path / "spool.sqlite")
    pub = _publisher(broker, spool)
    pub.start()  # the broker is not running yet
    for seq in range(5):
        _measure(spool, pub, seq)
    assert not pub.connected.is_set() and spool.depth() == 5
    broker.start()
    try:
        sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
        assert pub.connected.wait(30)
        assert sub.wait_for(lambda: len(_seqs(sub)) == 5, timeout=30)
        live = spool.put(MEASUREMENT, json.dumps({"schema": 1, "seq": 5}).encode())
        pub.notify_spooled()
        assert live > 0 and sub.wait_for(lambda: len(_seqs(sub)) == 6)
        messages = [json.loads(p) for p in sub.payloads(MEASUREMENT)]
        assert [m.get("historical", False) for m in messages] == [True] * 5 + [False]
        pub.stop()
        sub.close()
    finally:
        broker.stop()


def test_broker_restarted_three_times_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.host, broker.port, MEASUREMENT)
    spool = Spool(tmp_path / "spool.sqlite")
    pub = _publisher(broker, spool)
    pub.start()
    assert pub.connected.wait(10)
    seq = 0
    for _restart in range(3):
        for _ in range(60):
            _measure(spool, pub, seq)
            seq += 1
        # Stopped while messages are in flight. (SIGKILL would also lose what the broker had
        # acknowledged but not yet saved or forwarded: the broker's loss, not one the publisher
        # can see; the publisher's side of that case is the in-flight resend covered here.)
        broker.stop()
        for _ in range(20):  # measuring goes on while the broker is away
            _measure(spool, pub, seq)
            seq += 1
        # The subscriber's persistent session (clean_session False) keeps its subscription.
        broker.start()
    for _ in range(20):
        _measure(spool, pub, seq)
        seq += 1
    assert sub.wait_for(lambda: set(_seqs(sub)) == set(range(seq)) and spool.depth() == 0, timeout=60), (
        f"missing {sorted(set(range(seq)) - set(_seqs(sub)))[:20]}, spool {spool.depth()}"
    )
    received = _seqs(sub)
    duplicates = len(received) - len(set(received))
    assert duplicates <= 3 * 20  # QoS 1 redelivery of what was in flight at each kill, recognisable by seq
    pub.stop()
    sub.close()


def test_wrong_password_is_a_clear_error_and_nothing_is_lost(tmp_path: Path) -> None:
    broker = Broker(tmp_path, passwords={"cellseg": "right-password"})
    broker.start()
    try:
        (tmp_path / "pw").write_text("wrong-password\n")
        spool = Spool(tmp_path / "spool.sqlite")
        pub = _publisher(broker, spool, username="cellseg", password=Secret(file=tmp_path / "pw"))
        pub.start()
        _measure(spool, pub, 0)
        assert not pub.connected.wait(3)
        assert "refused the connection" in pub.last_error and "wrong-password" not in pub.last_error
        assert spool.depth() == 1  # kept for when the password is fixed
        pub.stop(flush_timeout_s=0.1)
    finally:
        broker.stop()


def test_home_assistant_discovery(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.host, broker.port, "homeassistant/#")
    pub = _publisher(broker, Spool(tmp_path / "spool.sqlite"), homeassistant_discovery=True)
    pub.start()
    assert pub.connected.wait(10)
    topic = "homeassistant/sensor/cellseg_test-scope/confluence/config"
    assert sub.wait_for(lambda: len(sub.payloads(topic)) == 1)
    body = json.loads(sub.payloads(topic)[0])
    assert body["state_topic"] == f"{PREFIX}/confluence" and body["unit_of_measurement"] == "%"
    assert body["availability_topic"] == f"{PREFIX}/availability"
    assert sub.payloads("homeassistant/sensor/cellseg_test-scope/count/config")
    pub.stop()
    sub.close()


@pytest.mark.parametrize(
    ("device_id", "node"),
    [("lab2.incubator-3", "cellseg_lab2_incubator-3"), ("scope_1", "cellseg_scope_1"), ("a.b.c", "cellseg_a_b_c")],
)
def test_discovery_ids_are_ones_home_assistant_accepts(
    broker: Broker, tmp_path: Path, device_id: str, node: str
) -> None:
    """Home Assistant ignores, without a word, discovery whose node or object id is not
    [a-zA-Z0-9_-]+: a device named lab2.incubator-3 (a valid device_id) used to vanish there."""
    prefix = f"cellseg/{device_id}"
    sub = Subscriber(broker.host, broker.port, "homeassistant/#")
    pub = _publisher(broker, Spool(tmp_path / "spool.sqlite"), prefix=prefix, homeassistant_discovery=True)
    pub.start()
    topic = f"homeassistant/sensor/{node}/count/config"
    assert sub.wait_for(lambda: len(sub.payloads(topic)) == 1), [t for t, _, _ in sub.messages]
    for t, payload, _retained in sub.messages:
        parts = t.split("/")
        assert all(re.fullmatch(r"[a-zA-Z0-9_-]+", p) for p in parts[2:4]), t
        body = json.loads(payload)
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", body["object_id"]) and re.fullmatch(r"[a-zA-Z0-9_-]+", body["unique_id"])
        assert body["state_topic"].startswith(prefix + "/")  # the real topics keep the real name
        assert body["origin"] == {"name": "cellseg", "sw_version": __version__}
        assert body["device"]["sw_version"] == __version__ and body["device"]["model"]
    count = json.loads(sub.payloads(topic)[0])
    confluence = json.loads(sub.payloads(f"homeassistant/sensor/{node}/confluence/config")[0])
    assert (count["suggested_display_precision"], confluence["suggested_display_precision"]) == (0, 1)
    pub.stop()
    sub.close()


def test_after_an_outage_a_new_subscriber_sees_the_newest_retained_values(broker: Broker, tmp_path: Path) -> None:
    pub = _publisher(broker, Spool(tmp_path / "spool.sqlite"))
    pub.start()
    assert pub.connected.wait(10)
    watcher = Subscriber(broker.host, broker.port, f"{PREFIX}/count")
    pub.publish_retained(COUNT, "10")
    assert watcher.wait_for(lambda: watcher.payloads(f"{PREFIX}/count") == [b"10"])
    watcher.close()
    broker.stop()  # the broker saves "10" as the retained count and goes away
    deadline = time.time() + 10
    while pub.connected.is_set() and time.time() < deadline:
        time.sleep(0.05)
    assert not pub.connected.is_set()
    pub.publish_retained(COUNT, "12")  # measured while the broker was away
    pub.publish_retained(CONFLUENCE, "7.5000")
    broker.start()
    assert pub.connected.wait(30)
    fresh = Subscriber(broker.host, broker.port, f"{PREFIX}/#")  # e.g. a dashboard starting now
    assert fresh.wait_for(lambda: fresh.payloads(f"{PREFIX}/count")[-1:] == [b"12"]), fresh.messages
    assert fresh.payloads(f"{PREFIX}/confluence")[-1:] == [b"7.5000"]
    pub.stop()
    fresh.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_with_username_and_password_from_a_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = Broker(tmp_path, passwords={"cellseg": "s3cret"}, tls=True)
    broker.start()
    try:
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "mqtt-password").write_text("s3cret\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        sub = Subscriber(broker.host, broker.port, MEASUREMENT, ca_file=broker.ca_file, username="cellseg",
                         password="s3cret")  # fmt: skip
        spool = Spool(tmp_path / "spool.sqlite")
        pub = _publisher(broker, spool, username="cellseg", password=Secret(credential="mqtt-password"),
                         tls=TlsConfig(ca_file=broker.ca_file))  # fmt: skip
        pub.start()
        assert pub.connected.wait(15), pub.last_error
        _measure(spool, pub, 0)
        assert sub.wait_for(lambda: _seqs(sub) == [0])
        pub.stop()
        sub.close()
    finally:
        broker.stop()
