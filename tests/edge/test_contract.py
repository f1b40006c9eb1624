"""The MQTT contract has one home (edge/service/contract.py), and the README's topic table says
what it says: a topic, QoS, retention or payload field changed in one and not the other fails here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cellseg.edge.pipeline.types import Measurement
from cellseg.edge.service.commands import SCHEMAS
from cellseg.edge.service.contract import COMMAND, DISCOVERY, MEASUREMENT, SCHEMA, TOPICS, measurement_payload

README = Path(__file__).resolve().parents[2] / "README.md"


def _row(name: str, retained: bool, qos: int, payload: str) -> str:
    return f"| `{name}` | {'yes' if retained else 'no'} | {qos} | {payload} |"


def test_the_readme_topic_table_is_the_contract() -> None:
    lines = README.read_text().splitlines()
    start = lines.index("| topic | retained | QoS | payload |")
    table = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        table.append(line)
    expected = [_row(f"<prefix>/{t.name}", t.retained, t.qos, t.payload) for t in TOPICS]
    expected.append(_row(DISCOVERY.name, DISCOVERY.retained, DISCOVERY.qos, DISCOVERY.payload))
    assert table == expected
    assert f'`"schema": {SCHEMA}`' in README.read_text()


def test_the_documented_measurement_fields_are_the_payloads() -> None:
    m = Measurement(seq=3, timestamp=1.0, source="t01.tif", count=2, confluence_pct=1.5,
                    areas_px=np.array([10, 20], np.int64), frame_width=64, frame_height=64)  # fmt: skip
    documented = re.search(r"\(([^)]*)\)", MEASUREMENT.payload)
    assert documented is not None
    assert set(measurement_payload(m, "fp32")) == {f.strip() for f in documented.group(1).split(",")}


def test_every_command_is_documented() -> None:
    assert all(f"`{name}`" in COMMAND.payload for name in SCHEMAS)
