"""The device's measurement history, per series, on disk: what growth curves are fitted on.

One SQLite file (``<state_dir>/history.sqlite``, WAL, one transaction a point), so it survives
restarts, outages and power cuts; a point is keyed by its series and acquisition time, so a
frame measured twice (a replayed backlog, a re-run) is stored once. Points older than
``keep_days`` before a series' newest are pruned. The points of each series are also kept in
memory, loaded once, so that fitting after each frame does not read the file back.

``cellseg history export`` writes it out as CSV or JSON lines (``cellseg growth`` reads both).
"""

from __future__ import annotations

import csv
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from cellseg.edge.capture.acquisition import iso_time
from cellseg.edge.errors import HistoryError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    series TEXT NOT NULL,
    acquired_at REAL NOT NULL,
    count INTEGER NOT NULL,
    confluence_pct REAL NOT NULL,
    seq INTEGER,
    source TEXT,
    PRIMARY KEY (series, acquired_at)
) WITHOUT ROWID;
"""
DAY = 86400.0
FIELDS = ("series", "acquired_at", "count", "confluence_pct", "seq", "source")


@dataclass(frozen=True)
class Point:
    series: str
    acquired_at: float
    count: int
    confluence_pct: float
    seq: int | None = None
    source: str = ""


class History:
    """Args:
    path: the SQLite file (made when missing).
    keep_days: how far back from each series' newest point the history reaches.
    """

    def __init__(self, path: Path, keep_days: float = 90.0) -> None:
        self.path = path
        self.keep_s = keep_days * DAY
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise HistoryError(f"cannot open the measurement history {path}: {e}") from e
        self._cache: dict[str, list[Point]] = {}

    def add(self, point: Point) -> None:
        """Store ``point`` (replacing one of the same series and time) and prune the series."""
        cutoff = point.acquired_at - self.keep_s
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?, ?, ?)",
                (point.series, point.acquired_at, point.count, point.confluence_pct, point.seq, point.source),
            )
            self._db.execute("DELETE FROM points WHERE series = ? AND acquired_at < ?", (point.series, cutoff))
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise HistoryError(f"cannot write the measurement history {self.path}: {e}") from e
        points = self._points(point.series)
        kept = [p for p in points if p.acquired_at != point.acquired_at and p.acquired_at >= cutoff]
        kept.append(point)
        if len(kept) > 1 and kept[-2].acquired_at > point.acquired_at:  # out of order: a replayed backlog
            kept.sort(key=lambda p: p.acquired_at)
        self._cache[point.series] = kept

    def _points(self, series: str) -> list[Point]:
        if series not in self._cache:
            rows = self._db.execute(
                f"SELECT {', '.join(FIELDS)} FROM points WHERE series = ? ORDER BY acquired_at", (series,)
            ).fetchall()
            self._cache[series] = [Point(*row) for row in rows]
        return self._cache[series]

    def arrays(self, series: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(acquisition times, counts, confluences) of ``series``, in time order."""
        points = self._points(series)
        return (np.array([p.acquired_at for p in points], np.float64), np.array([p.count for p in points], np.float64),
                np.array([p.confluence_pct for p in points], np.float64))  # fmt: skip

    def series(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT DISTINCT series FROM points ORDER BY series")]

    def export(self, out: IO[str], fmt: str = "jsonl", series: str | None = None) -> int:
        """Write the history (one series, or all) as ``csv`` or ``jsonl``; the number of points."""
        names = [series] if series is not None else self.series()
        writer = csv.writer(out) if fmt == "csv" else None
        if writer is not None:
            writer.writerow(FIELDS)
        written = 0
        for name in names:
            for p in self._points(name):
                row = {"series": p.series, "acquired_at": iso_time(p.acquired_at), "count": p.count,
                       "confluence_pct": p.confluence_pct, "seq": p.seq, "source": p.source}  # fmt: skip
                if writer is not None:
                    writer.writerow([row[f] for f in FIELDS])
                else:
                    out.write(json.dumps(row) + "\n")
                written += 1
        return written

    def close(self) -> None:
        self._db.close()
