"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``): a datagram to ``$NOTIFY_SOCKET``.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon runs the same way
from a shell.
"""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() else None
        self._last_ping = -1e9
        self._failing = False  # warn once per spell of failures, not at every ping

    @property
    def ping_interval_s(self) -> float:
        """How often a loop should come round to ping: a quarter of the watchdog period, at most 1 s."""
        return min(1.0, self.watchdog_s / 4) if self.watchdog_s else 1.0

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        # A leading '@' names a socket in the abstract namespace (a leading NUL byte).
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Non-blocking: a unix datagram socket whose reader lags blocks the sender, and
                # a stalled supervisor must not stall the measuring.
                sock.setblocking(False)
                sock.sendto("\n".join(fields).encode(), target)
        except BlockingIOError:
            logger.debug("notify socket %s is full; dropped %s", self.address, fields)
        except OSError as e:  # never let supervision trouble stop the measuring
            logger.log(logging.DEBUG if self._failing else logging.WARNING, "cannot notify systemd at %s: %s",
                       self.address, e)  # fmt: skip
            self._failing = True
        else:
            if self._failing:
                logger.warning("notifying systemd at %s works again", self.address)
                self._failing = False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        """Ping the watchdog, at most four times per watchdog period (every frame would be noise)."""
        now = time.monotonic()
        if self.watchdog_s is not None and now - self._last_ping < self.watchdog_s / 4:
            return
        self._last_ping = now
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
