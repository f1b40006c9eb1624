"""Flashing a running daemon (`cellseg run` in its own process) over MQTT and from a shell, with
a real mosquitto and bundles served over real HTTP: the good bundle takes over between frames
without a measurement lost, each bad one is refused with its reason while measuring goes on."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cellseg.build.bundle import generate_keypair
from tests.bundle_tools import bad_bundles
from tests.conftest import SHIPPED_MODEL
from tests.edge.test_daemon import PREFIX, _ensure_dead, _seqs, _start, _stop
from tests.mqtt_broker import Broker, Subscriber

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="mosquitto is not installed"),
]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_flashing_a_running_daemon(
    data_root: Path,
    tmp_path: Path,
    bundles: dict[str, Path],
    signing_keys: tuple[Path, Path],
    http_dir: tuple[Path, str],
) -> None:
    www, base = http_dir
    good = bundles["int8"]  # 4 MB: under the device's 8 MB limit; the 12 MB FP32 bundle is over it
    stranger, _ = generate_keypair(tmp_path / "stranger")
    cases = {name: path for name, (path, _) in bad_bundles(good, signing_keys[0], stranger, tmp_path).items()}
    phrases = {name: phrase for name, (_, phrase) in bad_bundles(good, signing_keys[0], stranger, tmp_path).items()}
    cases["oversized"], phrases["oversized"] = bundles["fp32"], "limit"
    for p in [good, *cases.values()]:
        (www / p.name).write_bytes(p.read_bytes())
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[:3]
    broker = Broker(tmp_path)
    broker.start()
    config = tmp_path / "cellseg.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "scope-7", "model": str(SHIPPED_MODEL), "state_dir": str(tmp_path / "state"),
        "engine": {"threads": 1},
        "source": {"kind": "images", "images": [str(p) for p in frames], "loop": True, "interval_s": 0.1},
        "mqtt": {"host": broker.host, "port": broker.port},
        "flash": {"trusted_keys": [str(signing_keys[1])], "max_download_mb": 8},
    }))  # fmt: skip
    sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
    proc = _start(config, tmp_path)

    def records() -> list[dict[str, Any]]:
        return [json.loads(p) for p in sub.payloads(f"{PREFIX}/measurement")]

    def flash(request_id: str, url: str, sha256: str) -> dict[str, Any]:
        sub.client.publish(f"{PREFIX}/cmd/flash", json.dumps({"id": request_id, "url": url, "sha256": sha256}), qos=1)

        def answer() -> list[dict[str, Any]]:
            return [r for r in map(json.loads, sub.payloads(f"{PREFIX}/cmd/flash/result")) if r["id"] == request_id]

        assert sub.wait_for(answer, timeout=60), (request_id, proc.stderr)
        return answer()[0]

    try:
        assert sub.wait_for(lambda: len(records()) >= 3, timeout=60), proc.stderr
        factory_id = records()[-1]["engine_id"]
        assert records()[-1]["precision"] == "fp32"

        ok = flash("good", f"{base}/{good.name}", _sha(good))
        assert ok["ok"] is True, ok
        assert ok["precision"] == "int8" and ok["self_test"]["boxes_found"] >= 0.9
        n = len(records())
        assert sub.wait_for(lambda: len(records()) >= n + 3, timeout=60)
        flashed_id = records()[-1]["engine_id"]
        assert flashed_id == ok["engine_id"] != factory_id and records()[-1]["precision"] == "int8"

        reasons = {}
        for name, bundle in cases.items():
            before = len(records())
            answer = flash(name, f"{base}/{bundle.name}", _sha(bundle))
            assert answer["ok"] is False and phrases[name] in answer["error"], (name, answer)
            reasons[name] = answer["error"]
            assert sub.wait_for(lambda b=before: len(records()) >= b + 1, timeout=30), name  # still measuring
            assert records()[-1]["engine_id"] == flashed_id, name  # on the engine it had
        assert len(set(reasons.values())) == len(reasons)
        wrong_hash = flash("wrong-hash", f"{base}/{good.name}", "ab" * 32)
        assert "sha256" in wrong_hash["error"]
        assert "scheme" in flash("ftp", "ftp://127.0.0.1/x.cellseg", _sha(good))["error"]
        # A local path, even of a good bundle: not over MQTT unless flash.allow_file_urls.
        assert "scheme 'file' is not allowed" in flash("file", good.as_uri(), _sha(good))["error"]

        # From a shell: `cellseg flash` activates, the running daemon swaps; `cellseg rollback` too.
        cli = [sys.executable, "-m", "cellseg"]
        done = subprocess.run([*cli, "flash", str(bundles["fp32"]), "--config", str(config)],
                              check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert sub.wait_for(lambda: records()[-1]["precision"] == "fp32", timeout=60)
        done = subprocess.run([*cli, "rollback", "--config", str(config)],
                              check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert sub.wait_for(lambda: records()[-1]["engine_id"] == flashed_id, timeout=60)

        state = json.loads(sub.payloads(f"{PREFIX}/state")[-1])
        assert state["engine"]["precision"] == "int8" and state["engine"]["slot"]
        # No measurement lost across four engine swaps and eleven refusals: consecutive sequence
        # numbers, and the looping source's frames in their order with none skipped.
        seqs = _seqs(sub)
        assert seqs == list(range(1, len(seqs) + 1))
        names = [Path(r["image"]).name for r in records()]
        order = [p.name for p in frames]
        assert all(order[(order.index(a) + 1) % 3] == b for a, b in itertools.pairwise(names))
        _stop(proc)
    finally:
        _ensure_dead(proc)
        sub.close()
        broker.stop()
