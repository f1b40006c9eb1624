"""The notify protocol's failure mode: a socket that is not there costs one warning, not one per ping."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cellseg.edge.service.sdnotify import Notifier
from tests.notify_socket import NotifySocket


def test_a_missing_socket_warns_once_and_recovery_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "notify.sock"
    notifier = Notifier(str(path))
    with caplog.at_level(logging.WARNING, logger="cellseg.edge.service.sdnotify"):
        for _ in range(20):
            notifier.send("WATCHDOG=1")
        peer = NotifySocket(path)  # systemd's end appears
        try:
            notifier.send("STATUS=back")
        finally:
            peer.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "cannot notify systemd" in warnings[0] and "works again" in warnings[1]
    assert peer.lines == ["STATUS=back"]
