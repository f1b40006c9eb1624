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

    def under(self, prefix: str, command: str = "") -> str:
        """The full topic; ``command`` fills ``<name>`` (``+`` subscribes to every command)."""
        return f"{prefix}/{self.name.replace('<name>', command)}"


AVAILABILITY = Topic("availability", True, 1, "`online` / `offline` (the last will)")
MEASUREMENT = Topic(
    "measurement", False, 1,
    "one JSON object per measurement (schema, seq, timestamp, acquired_at, acquired_from, source, image, width, "
    "height, count, confluence_pct, areas, latencies_ms, engine_id, precision), through the durable spool; "
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
COMMAND = Topic("cmd/<name>", False, 1, "commands (`flash`, `snapshot`, `reload`): a flat JSON object, validated")
COMMAND_RESULT = Topic("cmd/<name>/result", False, 1, "JSON reply: the request's `id`, `ok`, `error` when refused")
TOPICS = (AVAILABILITY, MEASUREMENT, COUNT, CONFLUENCE, STATE, SNAPSHOT, COMMAND, COMMAND_RESULT)
# Home Assistant discovery (optional), under its own prefix, retained, QoS 1.
DISCOVERY = Topic("<discovery_prefix>/sensor/<node>/<key>/config", True, 1, "Home Assistant discovery (optional)")


def measurement_payload(m: Measurement, precision: str | None = None) -> dict[str, Any]:
    """The JSON form of one measurement: the MQTT ``measurement`` payload, and what
    ``cellseg predict --json`` prints (without the schema and precision)."""
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
        record.update(schema=SCHEMA, precision=precision)
    return record


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


def discovery_messages(prefix: str, discovery_prefix: str) -> list[tuple[str, str]]:
    """Home Assistant MQTT discovery for the count and confluence sensors (retained).

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
    sensors = {
        COUNT: {"name": "Cell count", "unit_of_measurement": "cells", "icon": "mdi:counter",
                "suggested_display_precision": 0},
        CONFLUENCE: {"name": "Confluence", "unit_of_measurement": "%", "icon": "mdi:percent",
                     "suggested_display_precision": 1},
    }  # fmt: skip
    messages = []
    for topic, extra in sensors.items():
        key = topic.name
        body = {
            **extra,
            "unique_id": f"{node}_{key}",
            "object_id": f"{node}_{key}",
            "state_topic": topic.under(prefix),
            "state_class": "measurement",
            "availability_topic": AVAILABILITY.under(prefix),
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device,
            "origin": {"name": "cellseg", "sw_version": __version__},
        }
        where = DISCOVERY.name.replace("<discovery_prefix>", discovery_prefix).replace("<node>", node)
        messages.append((where.replace("<key>", key), json.dumps(body)))
    return messages
