"""The history per series on the device, the daemon's growth topic and event, and the export
``cellseg growth`` reads: with real frames measured by a real daemon and a real broker."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cellseg.edge.config import parse_config
from cellseg.edge.growth.history import History, Point
from cellseg.edge.growth.tracker import GrowthTracker
from cellseg.edge.pipeline.types import Measurement
from cellseg.edge.service.contract import discovery_messages
from cellseg.edge.service.daemon import Daemon
from tests.conftest import SHIPPED_MODEL
from tests.mqtt_broker import Broker, Subscriber

T0 = 1_790_000_000.0
PREFIX = "cellseg/scope-h"


def test_the_history_survives_a_restart_keeps_one_point_per_time_and_prunes(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    history = History(path, keep_days=2.0)
    for i in range(5):
        history.add(Point("A1", T0 + i * 3600, 100 + i, 5.0 + i))
    history.add(Point("A1", T0 + 3600, 150, 9.0))  # the same frame measured again (a re-run)
    history.add(Point("B2", T0, 50, 2.0))
    history.close()
    again = History(path, keep_days=2.0)
    t, counts, confluence = again.arrays("A1")
    assert list(counts) == [100, 150, 102, 103, 104] and list(t) == [T0 + i * 3600 for i in range(5)]
    assert list(confluence) == [5.0, 9.0, 7.0, 8.0, 9.0]
    assert again.series() == ["A1", "B2"]
    again.add(Point("A1", T0 + 3 * 86400, 400, 30.0))  # three days on: what is older than two days goes
    assert list(again.arrays("A1")[0]) == [T0 + 3 * 86400]
    out = io.StringIO()
    assert again.export(out, "csv") == 2
    assert out.getvalue().splitlines()[0] == "series,acquired_at,count,confluence_pct,seq,source"
    again.close()


def _measurement(i: int, hours: float, confluence: float, source: str = "well_A1_t.tif") -> Measurement:
    count = round(confluence * 25)
    return Measurement(seq=i, timestamp=T0 + 1e6, source=source, count=count, confluence_pct=confluence,
                       areas_px=np.full(count, 100, np.int64), frame_width=512, frame_height=512,
                       acquired_at=T0 + hours * 3600)  # fmt: skip


def test_the_tracker_fits_each_series_and_announces_a_passage_once_per_segment(tmp_path: Path) -> None:
    config = parse_config({"device_id": "scope-h", "state_dir": str(tmp_path),
                           "source": {"kind": "images", "images": ["a.png"]},
                           "growth": {"series_from_name": "well_(?P<series>[A-H][0-9]+)_"}})  # fmt: skip
    tracker = GrowthTracker(config)
    rate = math.log(2) / 20.0
    measurements = [_measurement(i, h, 12.0 * math.exp(rate * h)) for i, h in enumerate(range(0, 58, 2))]
    updates = [tracker.observe(m, tracker.series_of(m.source)) for m in measurements]
    assert {u.series for u in updates} == {"A1"}
    last = updates[-1].fit
    assert last["status"] == "growing" and abs(last["doubling_time_h"] / 20.0 - 1) < 0.01
    due = [u for u in updates if u.passage_due_at is not None]
    assert len(due) == 1 and due[0].fit["passage_due"]  # once, when 70 % was first reached
    assert tracker.series_of("/data/plate_t01.tif") == "scope-h"  # no well in the name: the default
    tracker.close()


def test_home_assistant_sees_doubling_time_eta_and_passage_due() -> None:
    messages = dict(discovery_messages("cellseg/scope-h", "homeassistant", "A1"))
    eta = json.loads(messages["homeassistant/sensor/cellseg_scope-h/passage_eta/config"])
    assert eta["device_class"] == "timestamp" and eta["state_topic"] == "cellseg/scope-h/growth/A1"
    due = json.loads(messages["homeassistant/binary_sensor/cellseg_scope-h/passage_due/config"])
    assert "passage_due" in due["value_template"]
    assert (
        json.loads(messages["homeassistant/sensor/cellseg_scope-h/doubling_time/config"])["unit_of_measurement"] == "h"
    )


def test_the_daemon_keeps_history_publishes_growth_and_exports_it(data_root: Path, tmp_path: Path) -> None:
    """The 12 real T98G frames (10.2 min apart by their names) through the daemon: each lands in
    the history, the retained growth topic says honestly that two hours are too few, and the
    history export is what cellseg growth reads."""
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))
    broker = Broker(tmp_path)
    broker.start()
    try:
        sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
        settings = {
            "device_id": "scope-h", "state_dir": str(tmp_path / "state"), "model": str(SHIPPED_MODEL),
            "source": {"kind": "images", "images": [str(p) for p in frames],
                       "time_from_name": {"pattern": r"t(?P<index>\d+)\.tif$", "interval_s": 612,
                                          "start": "2018-01-01T09:00:00+01:00"}},
            "mqtt": {"host": broker.host, "port": broker.port},
        }  # fmt: skip
        config_file = tmp_path / "cellseg.yaml"
        config_file.write_text(json.dumps(settings))
        daemon = Daemon(parse_config(settings))
        done: list[int] = []
        runner = threading.Thread(target=lambda: done.append(daemon.run()), daemon=True)
        runner.start()
        runner.join(timeout=180)
        assert done == [0]
        assert sub.wait_for(lambda: len(sub.payloads(f"{PREFIX}/growth/scope-h")) >= 12, timeout=30)
        growth = json.loads(sub.payloads(f"{PREFIX}/growth/scope-h")[-1])
        assert growth["series"] == "scope-h" and growth["n_points"] == 12
        assert growth["status"] == "insufficient data" and "has 12 over 1.9 h" in growth["reason"]
        records = [json.loads(p) for p in sub.payloads(f"{PREFIX}/measurement")]
        assert {r["series"] for r in records} == {"scope-h"}
        sub.close()
    finally:
        broker.stop()
    exported = tmp_path / "history.jsonl"
    subprocess.run([sys.executable, "-m", "cellseg", "history", "export", "--config", str(config_file), "--jsonl", "-o",
                    str(exported)], check=True, timeout=120)  # fmt: skip
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["acquired_at"] == "2018-01-01T08:10:12.000+00:00"
    fit = subprocess.run([sys.executable, "-m", "cellseg", "growth", str(exported), "--json"], capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    assert json.loads(fit.stdout)["n_points"] == 12


def test_history_export_says_what_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"device_id": "x", "state_dir": str(tmp_path / "state"),
                                  "source": {"kind": "images", "images": ["a.png"]}}))  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "cellseg", "history", "export", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 2 and "no history at" in proc.stderr


@pytest.mark.parametrize("pattern", ["well_([A-H][0-9]+)", "well_(?P<series>[A-H][0-9]+"])
def test_a_series_pattern_without_its_group_is_refused(pattern: str) -> None:
    from cellseg.edge.errors import ConfigError

    with pytest.raises(ConfigError, match="series_from_name"):
        parse_config({"device_id": "x", "source": {"kind": "images", "images": ["a.png"]},
                      "growth": {"series_from_name": pattern}})  # fmt: skip


def test_a_growth_plot_on_request_over_mqtt(data_root: Path, tmp_path: Path) -> None:
    """cmd/growth_plot, like the snapshot: the PNG of the series' curve on growth_plot/<series>
    and a reply; a series with no measurements gets a reason, and measuring goes on."""
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))[:4]
    broker = Broker(tmp_path)
    broker.start()
    daemon: Daemon | None = None
    runner: threading.Thread | None = None
    try:
        sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
        daemon = Daemon(parse_config({
            "device_id": "scope-h", "state_dir": str(tmp_path / "state"), "model": str(SHIPPED_MODEL),
            "source": {"kind": "images", "images": [str(p) for p in frames], "loop": True, "interval_s": 0.5},
            "mqtt": {"host": broker.host, "port": broker.port},
        }))  # fmt: skip
        runner = threading.Thread(target=daemon.run, daemon=True)
        runner.start()
        assert sub.wait_for(lambda: len(sub.payloads(f"{PREFIX}/growth/scope-h")) >= 2, timeout=60)
        sub.client.publish(f"{PREFIX}/cmd/growth_plot", b'{"id": "p1"}', qos=1)
        sub.client.publish(f"{PREFIX}/cmd/growth_plot", b'{"id": "p2", "series": "B7"}', qos=1)
        assert sub.wait_for(lambda: len(sub.payloads(f"{PREFIX}/cmd/growth_plot/result")) == 2, timeout=60)
        replies = {r["id"]: r for r in map(json.loads, sub.payloads(f"{PREFIX}/cmd/growth_plot/result"))}
        assert replies["p1"]["ok"] and replies["p1"]["series"] == "scope-h" and replies["p1"]["points"] >= 2
        assert not replies["p2"]["ok"] and "no measurements in series 'B7'" in replies["p2"]["error"]
        png = sub.payloads(f"{PREFIX}/growth_plot/scope-h")[-1]
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) == replies["p1"]["bytes"]
        measured = len(sub.payloads(f"{PREFIX}/measurement"))
        assert sub.wait_for(lambda: len(sub.payloads(f"{PREFIX}/measurement")) > measured, timeout=30)
        sub.close()
    finally:
        if daemon is not None:
            daemon.request_stop()
        if runner is not None:
            runner.join(timeout=30)
        broker.stop()
