"""A device on disk for daemon tests: real frames in a watched folder and a configuration that
measures them and publishes to a given broker."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from tests.mqtt_broker import Broker


def folder_device(
    tmp_path: Path, broker: Broker, device_id: str, frames: Sequence[Path], pattern: str = "*.tif"
) -> tuple[Path, Path]:
    """``frames`` copied into ``tmp_path/incoming``; returns (configuration file, watched folder)."""
    incoming = tmp_path / "incoming"
    incoming.mkdir(exist_ok=True)
    for frame in frames:
        shutil.copy(frame, incoming)
    config = tmp_path / "cellseg.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": device_id, "state_dir": str(tmp_path / "state"),
        "source": {"kind": "folder", "path": str(incoming), "pattern": pattern},
        "mqtt": {"host": broker.host, "port": broker.port},
    }))  # fmt: skip
    return config, incoming
