"""The MQTT contract: every topic the device publishes or listens on, how (retained, QoS), and the
JSON payloads with their schema version. The publisher and the daemon build topics and payloads
only here; README's topic table is checked against :data:`TOPICS` by a test.

Topics live under a prefix (``cellseg/<device_id>`` by default). JSON payloads carry
``"schema": SCHEMA``; a change that removes or renames a field raises it, one that adds a field
does not (subscribers ignore keys they do not know).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cellseg import __version__
from cellseg.edge.capture.acquisition import iso_time
from cellseg.edge.pipeline.measure import area_summary
from cellseg.edge.pipeline.types import Measurement

SCHEMA = 1
# Home Assistant accepts node and object ids of these characters only; others become '_'.
_HA_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Topic:
    """One topic: its name under the prefix (``<name>`` marks a command's name), whether the
    broker retains it, its QoS, and what it carries (the README's words)."""

    name: str
    retained: bool
    qos: int
    payload: str

    def under(self, prefix: str, name: str = "") -> str:
        """The full topic; ``name`` fills its ``<...>`` part: a command's name (``+`` subscribes
        to every command) or a series."""
        return f"{prefix}/{re.sub(r'<[a-z_]+>', name, self.name)}"


AVAILABILITY = Topic("availability", True, 1, "`online` / `offline` (the last will)")
MEASUREMENT = Topic(
    "measurement", False, 1,
    "one JSON object per measurement (schema, seq, timestamp, acquired_at, acquired_from, series, source, image, "
    "width, height, count, confluence_pct, areas, latencies_ms, engine_id, precision), through the durable spool; "
    "`acquired_at` is when the frame was taken (ISO 8601), `timestamp` when it was measured (epoch s); "
    "`historical: true` when replayed after an outage",
)  # fmt: skip
COUNT = Topic("count", True, 1, "the latest cell count, a plain number")
CONFLUENCE = Topic("confluence", True, 1, "the latest confluence in %, a plain number")
STATE = Topic(
    "state", True, 1,
    "JSON: engine (id, backend, precision, slot), version, uptime, fps, spool depth, last flash, last error",
)  # fmt: skip
SNAPSHOT = Topic("snapshot", False, 0, "JPEG overlay of the last frame, on request (`cmd/snapshot`)")
GROWTH_PLOT = Topic("growth_plot/<series>", False, 0, "PNG of a series' growth curve, on request (`cmd/growth_plot`)")
GROWTH = Topic(
    "growth/<series>", True, 1,
    "JSON per series, after each measurement: status, doubling_time_h with doubling_time_ci95_h, growth_rate_per_h, "
    "passage_eta (ISO 8601) with passage_eta_ci95, passage_due, target_confluence_pct, segment_start, n_points",
)  # fmt: skip
EVENT = Topic("event", False, 1, "JSON events: `passage_due` (series, at, confluence_pct) once per segment")
COMMAND = Topic(
    "cmd/<name>", False, 1,
    "commands (`flash`, `snapshot`, `reload`, `growth_plot`): a flat JSON object, validated",
)  # fmt: skip
COMMAND_RESULT = Topic("cmd/<name>/result", False, 1, "JSON reply: the request's `id`, `ok`, `error` when refused")
TOPICS = (AVAILABILITY, MEASUREMENT, COUNT, CONFLUENCE, STATE, GROWTH, EVENT, SNAPSHOT, GROWTH_PLOT, COMMAND,
          COMMAND_RESULT)  # fmt: skip
# Home Assistant discovery (optional), under its own prefix, retained, QoS 1.
DISCOVERY = Topic(
    "<discovery_prefix>/<component>/<node>/<key>/config", True, 1,
    "Home Assistant discovery (optional): count, confluence, doubling time, passage ETA, passage due",
)  # fmt: skip


def measurement_payload(m: Measurement, precision: str | None = None, series: str | None = None) -> dict[str, Any]:
    """The JSON form of one measurement: the MQTT ``measurement`` payload (with its schema,
    precision and series), and what ``cellseg predict --json`` prints (without them)."""
    record: dict[str, Any] = {
        "seq": m.seq,
        "timestamp": m.timestamp,
        "acquired_at": iso_time(m.acquired_at) if m.acquired_at is not None else None,
        "acquired_from": m.acquired_from or None,
        "source": m.source,
        "image": m.source,
        "count": m.count,
        "confluence_pct": round(m.confluence_pct, 4),
        "width": m.frame_width,
        "height": m.frame_height,
        "areas": area_summary(m),
        "latencies_ms": {k: round(v, 3) for k, v in m.latencies_ms.items()},
        "engine_id": m.engine_id,
    }
    if precision is not None:
        record.update(schema=SCHEMA, precision=precision, series=series)
    return record


def safe_series(name: str) -> str:
    """A series name fit for a topic level (no ``/``, ``+``, ``#``) and Home Assistant ids."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def growth_payload(series: str, fit: dict[str, Any]) -> str:
    """The retained ``growth/<series>`` payload: the fit (:meth:`GrowthFit.to_dict`)."""
    return json.dumps({"schema": SCHEMA, "series": series, **fit})


def passage_due_event(series: str, at: float, confluence_pct: float) -> str:
    return json.dumps({"schema": SCHEMA, "event": "passage_due", "series": series, "at": iso_time(at),
                       "confluence_pct": round(confluence_pct, 2)})  # fmt: skip


def count_payload(m: Measurement) -> str:
    return str(m.count)


def confluence_payload(m: Measurement) -> str:
    return f"{m.confluence_pct:.4f}"


def mark_historical(payload: bytes) -> bytes:
    """A spooled measurement replayed after an outage or restart: ``"historical": true`` added."""
    try:
        data = json.loads(payload)
    except ValueError:
        return payload
    if isinstance(data, dict):
        data["historical"] = True
        return json.dumps(data).encode()
    return payload


@dataclass(frozen=True)
class DaemonState:
    """What the retained ``state`` topic reports."""

    engine: dict[str, Any]
    last_flash: dict[str, Any]
    uptime_s: float
    measured: int
    spool_depth: int
    spool_dropped: int
    last_error: str


def state_payload(state: DaemonState) -> str:
    fps = state.measured / state.uptime_s if state.uptime_s > 0 else 0.0
    return json.dumps({
        "schema": SCHEMA,
        "version": __version__,
        "engine": state.engine,
        "last_flash": state.last_flash,
        "uptime_s": round(state.uptime_s, 1),
        "measured": state.measured,
        "fps": round(fps, 4),
        "spool_depth": state.spool_depth,
        "spool_dropped": state.spool_dropped,
        "last_error": state.last_error,
    })  # fmt: skip


def reply(request_id: str | None, ok: bool, error: str = "", **extra: Any) -> bytes:
    """A command's reply on ``cmd/<name>/result``."""
    body: dict[str, Any] = {"schema": SCHEMA, "id": request_id, "ok": ok}
    if error:
        body["error"] = error
    body.update(extra)
    return json.dumps(body).encode()


def discovery_messages(prefix: str, discovery_prefix: str, growth_series: str | None = None) -> list[tuple[str, str]]:
    """Home Assistant MQTT discovery (retained): count and confluence sensors and, given the
    series whose growth to show, its doubling time, passage ETA and a "passage due" binary sensor.

    Home Assistant drops a discovery topic whose node id has characters other than
    ``[A-Za-z0-9_-]`` without a word, so the prefix is mapped onto those (``lab2.incubator-3``
    becomes ``lab2_incubator-3``); the state topics keep the real prefix.
    """
    node = _HA_UNSAFE.sub("_", prefix.replace("/", "_"))
    device = {
        "identifiers": [node],
        "name": f"cellseg {prefix.rsplit('/', 1)[-1]}",
        "manufacturer": "cellseg",
        "model": "live cell-culture monitor",
        "sw_version": __version__,
    }
    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("sensor", COUNT.name, {"name": "Cell count", "unit_of_measurement": "cells", "icon": "mdi:counter",
                                "suggested_display_precision": 0, "state_topic": COUNT.under(prefix),
                                "state_class": "measurement"}),
        ("sensor", CONFLUENCE.name, {"name": "Confluence", "unit_of_measurement": "%", "icon": "mdi:percent",
                                     "suggested_display_precision": 1, "state_topic": CONFLUENCE.under(prefix),
                                     "state_class": "measurement"}),
    ]  # fmt: skip
    if growth_series is not None:
        growth = GROWTH.under(prefix, safe_series(growth_series))
        entities += [
            ("sensor", "doubling_time", {"name": "Doubling time", "unit_of_measurement": "h", "icon": "mdi:chart-line",
                                         "device_class": "duration", "suggested_display_precision": 1,
                                         "state_topic": growth, "value_template": "{{ value_json.doubling_time_h }}"}),
            ("sensor", "passage_eta", {"name": "Passage due at", "device_class": "timestamp", "state_topic": growth,
                                       "value_template": "{{ value_json.passage_eta }}"}),
            ("binary_sensor", "passage_due", {"name": "Passage due", "icon": "mdi:flask", "state_topic": growth,
                                              "value_template": "{{ 'ON' if value_json.passage_due else 'OFF' }}"}),
        ]  # fmt: skip
    messages = []
    for component, key, extra in entities:
        body = {
            **extra,
            "unique_id": f"{node}_{key}",
            "object_id": f"{node}_{key}",
            "availability_topic": AVAILABILITY.under(prefix),
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device,
            "origin": {"name": "cellseg", "sw_version": __version__},
        }
        where = (DISCOVERY.name.replace("<discovery_prefix>", discovery_prefix).replace("<component>", component)
                 .replace("<node>", node).replace("<key>", key))  # fmt: skip
        messages.append((where, json.dumps(body)))
    return messages
