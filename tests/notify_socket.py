"""systemd's side of the sd_notify protocol for tests: a datagram socket read continuously, each
line kept with the monotonic time it arrived (to tell when the watchdog pings stopped)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.stamped: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @property
    def lines(self) -> list[str]:
        return [line for _, line in self.stamped]

    def pings(self) -> list[float]:
        """When each WATCHDOG=1 arrived."""
        return [t for t, line in self.stamped if line == "WATCHDOG=1"]

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            self.stamped.extend((now, line) for line in data.decode().splitlines())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
