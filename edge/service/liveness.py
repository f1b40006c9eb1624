"""Liveness: systemd's watchdog is fed only while every part that must run shows progress.

The daemon is several threads: capture, the inference loop (which also writes the spool), the
MQTT network loop and the spool sender. Pinging the watchdog from the inference loop alone
proved too little: when paho's network thread died on an exception, the loop went on pinging
and the device became a zombie that measured into its spool and never published again. So each
part beats here when it makes progress, and the loop pings only while no part is stalled:
a part is stalled when its thread has ended or it has not beaten within its allowed silence.
Then systemd's watchdog restarts the service, which is the one fix for a dead or hung thread.

Beats are plain writes of a monotonic time (atomic under the GIL); nothing here blocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Beat = Callable[[], None]


@dataclass
class _Part:
    max_silence_s: float
    thread: threading.Thread | None = None
    last: float = field(default_factory=time.monotonic)


class Liveness:
    """Parts by name; :meth:`stalled` says which of them have stopped making progress."""

    def __init__(self) -> None:
        self._parts: dict[str, _Part] = {}
        self._lock = threading.Lock()

    def register(self, name: str, max_silence_s: float, thread: threading.Thread | None = None) -> None:
        """Watch ``name``: stalled once ``thread`` (if given) ends or no beat came for ``max_silence_s``."""
        with self._lock:
            self._parts[name] = _Part(max_silence_s, thread)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._parts.pop(name, None)

    def beat(self, name: str) -> None:
        part = self._parts.get(name)
        if part is not None:
            part.last = time.monotonic()

    def beater(self, name: str) -> Beat:
        """A callable that beats for ``name`` (handed to code that must not know the registry)."""
        return lambda: self.beat(name)

    def stalled(self) -> dict[str, str]:
        """Each stalled part, with why: ``{"mqtt-network": "its thread ended"}``."""
        now = time.monotonic()
        with self._lock:
            parts = list(self._parts.items())
        reasons = {}
        for name, part in parts:
            if part.thread is not None and not part.thread.is_alive():
                reasons[name] = "its thread ended"
            elif now - part.last > part.max_silence_s:
                reasons[name] = f"no progress for {now - part.last:.0f} s"
        return reasons
