"""The durable spool: every measurement is written here before it is published, and leaves only
when the broker has acknowledged it (QoS 1 PUBACK).

paho-mqtt keeps unacknowledged messages in memory only; a crash, a power cut or a restart
would lose them. The spool is one SQLite file in WAL mode with ``synchronous=FULL``: a
``put`` that returned is on disk. Messages come back out in the order they went in.

When the spool reaches ``max_messages`` (the broker has been away for a long time), the policy
decides: ``drop_oldest`` deletes the oldest message and counts it in ``dropped`` (reported in
the state topic, never silent); ``stop_measuring`` refuses the new one with
:class:`SpoolFullError` so the caller can pause.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cellseg.edge.errors import SpoolError, SpoolFullError


@dataclass(frozen=True)
class SpooledMessage:
    id: int
    topic: str
    payload: bytes
    created: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('dropped', 0);
INSERT OR IGNORE INTO counters VALUES ('seq', 0);
CREATE TABLE IF NOT EXISTS done (key TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""


def read_depth(path: Path) -> int:
    """Messages waiting in the spool at ``path``, read without writing anything (another process,
    the running daemon, may hold it); SpoolError when it cannot be read."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error as e:
        raise SpoolError(f"{path}: cannot read: {e}") from e


class Spool:
    """A durable FIFO of MQTT messages, shared by the pipeline (put) and the publisher (take, ack).

    Args:
        path: the SQLite file (created with its folder).
        max_messages: bound on the number of messages held.
        when_full: ``drop_oldest`` or ``stop_measuring``.
    """

    def __init__(
        self,
        path: Path,
        max_messages: int = 1_000_000,
        when_full: Literal["drop_oldest", "stop_measuring"] = "drop_oldest",
    ) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.when_full = when_full
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One connection shared under a lock: SQLite serialises writers anyway, and a single
            # connection keeps the order of puts and acks exactly as the callers made them.
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise SpoolError(f"{self.path}: cannot open the spool: {e}") from e

    def put(self, topic: str, payload: bytes) -> int:
        """Store a message durably; returns its id (increasing)."""
        return self.put_measurement(topic, lambda _seq: payload, done_key=None, count_seq=False)[0]

    def put_measurement(
        self, topic: str, build: Callable[[int], bytes], done_key: str | None = None, count_seq: bool = True
    ) -> tuple[int, int]:
        """Store a measurement in one transaction with its sequence number and its input's mark.

        ``build(seq)`` makes the payload for the next sequence number (consecutive across
        restarts); ``done_key`` (e.g. a watched file's name, size and time) is recorded as
        processed in the same transaction, so a crash can neither lose the measurement nor
        measure the file twice. Returns (message id, seq).
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                count = self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
                if count >= self.max_messages:
                    if self.when_full == "stop_measuring":
                        self._db.execute("ROLLBACK")
                        raise SpoolFullError(
                            f"{self.path}: spool full ({count} messages) and its policy is stop_measuring"
                        )
                    excess = count - self.max_messages + 1
                    self._db.execute(
                        "DELETE FROM messages WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT ?)", (excess,)
                    )
                    self._db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (excess,))
                seq = int(self._db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0])
                if count_seq:
                    seq += 1
                    self._db.execute("UPDATE counters SET value = ? WHERE name = 'seq'", (seq,))
                cursor = self._db.execute(
                    "INSERT INTO messages (topic, payload, created) VALUES (?, ?, ?)", (topic, build(seq), time.time())
                )
                if done_key is not None:
                    self._db.execute("INSERT OR REPLACE INTO done (key, seq) VALUES (?, ?)", (done_key, seq))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise SpoolError(f"{self.path}: cannot store a message: {e}") from e
            return int(cursor.lastrowid or 0), seq

    def is_done(self, key: str) -> bool:
        """Whether an input with this key was measured (see :meth:`put_measurement`)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM done WHERE key = ?", (key,)).fetchone() is not None

    def oldest(self, limit: int = 100, after: int = 0) -> list[SpooledMessage]:
        """Up to ``limit`` messages with id > ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, created FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
        return [SpooledMessage(int(r[0]), str(r[1]), bytes(r[2]), float(r[3])) for r in rows]

    def ack(self, message_id: int) -> None:
        """The broker has the message: forget it."""
        with self._lock:
            self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def dropped(self) -> int:
        """Messages deleted unsent by the drop_oldest policy, over the spool's life."""
        with self._lock:
            return int(self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
