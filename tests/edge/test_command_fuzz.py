"""Hostile commands against a running daemon and a real mosquitto: 1,200 seeded payloads (deep
nesting, oversize, binary, wrong types, odd command names, some valid ones) on `cmd/<name>`.
Every one is answered, measuring goes on, and the process keeps feeding the watchdog and
publishing. (Before, one payload of 30,000 '[' ended paho's network thread for good.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cellseg.edge.service.commands import MAX_PAYLOAD
from tests.mqtt_broker import Broker, Subscriber
from tests.notify_socket import NotifySocket

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="mosquitto is not installed"),
]
PREFIX = "cellseg/fuzz-1"
PAYLOADS = 1200
SEED = 20261129


def _value(rng: random.Random) -> object:
    """A JSON value of a type a field does not expect."""
    return rng.choice([None, True, -1, 2**70, 1e308, -0.0, "", "x" * rng.randint(1, 300), [], {}, [1, "a"],
                       {"k": [None]}, "\u202e\ud7ff", "\x00"])  # fmt: skip


def fuzz_payloads(rng: random.Random) -> list[tuple[str, bytes]]:
    """(command name, payload) pairs, each kind of hostile input many times over."""
    names = ["snapshot", "flash", "reload", "reload", "flash"]
    out: list[tuple[str, bytes]] = []
    for i in range(PAYLOADS):
        name = rng.choice(names)
        kind = i % 12
        if kind == 0:  # deep nesting of arrays or objects, up to the size limit
            depth = rng.randint(9, 30000)
            payload = (b"[" * depth) if rng.random() < 0.5 else (b'{"a":' * depth + b"1" + b"}" * depth)
        elif kind == 1:  # nesting within the limit, in a field
            payload = json.dumps({"id": "n", "quality": json.loads("[" * 7 + "]" * 7)}).encode()
        elif kind == 2:  # just under and over the size limit
            payload = json.dumps({"id": "x" * (MAX_PAYLOAD - rng.randint(-100, 200))}).encode()
        elif kind == 3:  # random bytes
            payload = rng.randbytes(rng.randint(0, 2048))
        elif kind == 4:  # JSON that is not an object
            payload = json.dumps(rng.choice([[1, 2], "snapshot", 3.5, None, True, [{}]])).encode()
        elif kind == 5:  # wrong types for every field
            payload = json.dumps({k: _value(rng) for k in rng.sample(["id", "quality", "format", "url", "sha256"], 3)},
                                 allow_nan=True).encode()  # fmt: skip
        elif kind == 6:  # unknown keys
            payload = json.dumps({"id": f"u{i}", "rm -rf /": True}).encode()
        elif kind == 7:  # unknown command names, some long, some odd
            name = rng.choice(["", "SNAPSHOT", "snapshot ", "ü" * 300, "cmd", "..", "\u0000x", "x" * 5000])
            name = name.replace("\x00", "")
            payload = b"{}"
        elif kind == 8:  # broken JSON and invalid UTF-8
            payload = rng.choice([b'{"id": "a"', b'{"id": "\xff"}', b"{'id': 1}", b'{"id": NaN}', b"\xef\xbb\xbf{}"])
        elif kind == 9:  # valid snapshots (a JPEG is made and sent each time)
            name, payload = "snapshot", json.dumps({"id": f"s{i}", "quality": rng.randint(10, 100)}).encode()
        elif kind == 10:  # valid-looking flashes of URLs that cannot be fetched, or are not allowed
            url = rng.choice(["http://127.0.0.1:9/b.cellseg", "file:///etc/shadow", "ftp://x/y", "gopher://a"])
            name, payload = "flash", json.dumps({"id": f"f{i}", "url": url, "sha256": "a" * 64}).encode()
        else:  # reloads with arguments they do not take (a valid reload would reconnect the client)
            name, payload = "reload", json.dumps({"id": f"r{i}", "now": _value(rng)}).encode()
        out.append((name, payload))
    return out


def test_every_hostile_command_is_answered_and_the_daemon_keeps_measuring(data_root: Path, tmp_path: Path) -> None:
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[:3]
    broker = Broker(tmp_path)
    broker.start()
    config = tmp_path / "cellseg.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "fuzz-1", "state_dir": str(tmp_path / "state"),
        "source": {"kind": "images", "images": [str(f) for f in frames], "loop": True, "interval_s": 0.3},
        "mqtt": {"host": broker.host, "port": broker.port},
    }))  # fmt: skip
    notify = NotifySocket(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="4000000")
    sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
    # The log goes to a file: ~1,000 refusals would fill an unread pipe and block the logging thread.
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen([sys.executable, "-m", "cellseg", "run", "--config", str(config)], env=env,
                              stdout=subprocess.DEVNULL, stderr=log, text=True)  # fmt: skip
    try:
        measured = lambda: len(sub.payloads(f"{PREFIX}/measurement"))  # noqa: E731
        assert sub.wait_for(lambda: measured() >= 2, timeout=60)
        payloads = fuzz_payloads(random.Random(SEED))
        sender = Subscriber(broker.host, broker.port, "fuzz/unused")  # a plain client to publish with
        for name, payload in payloads:
            sender.client.publish(f"{PREFIX}/cmd/{name}", payload, qos=1).wait_for_publish(10)
        fuzz_done, before = time.monotonic(), measured()

        def replies() -> int:
            return sum(1 for t, _, _ in sub.messages if t.startswith(f"{PREFIX}/cmd/") and t.endswith("/result"))

        assert sub.wait_for(lambda: replies() >= len(payloads), timeout=120), (
            f"{replies()} of {len(payloads)} answered; {(tmp_path / 'daemon.log').read_text()[-3000:]}"
        )
        time.sleep(1.0)
        assert replies() == len(payloads)  # one answer each, no more
        answers = [json.loads(p) for t, p, _ in sub.messages if t.endswith("/result")]
        assert all(a["schema"] == 1 and isinstance(a["ok"], bool) for a in answers)
        refused = [a for a in answers if not a["ok"]]
        assert all(a["error"] for a in refused)
        assert any("nests" in a["error"] for a in refused) and any("exceeds" in a["error"] for a in refused)
        assert sum(a["ok"] for a in answers) >= PAYLOADS // 12 // 2  # the valid snapshots went through
        # Measuring and publishing go on, and so do the watchdog pings.
        assert sub.wait_for(lambda: measured() >= before + 3, timeout=60)
        assert daemon.poll() is None
        assert notify.pings()[-1] > fuzz_done
        sender.close()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        log.close()
        sub.close()
        notify.close()
        broker.stop()
