"""``cellseg growth``: the growth fit of measurements on file.

Reads ``cellseg predict --json`` output or any JSON-lines history (one object per line with
``acquired_at`` (ISO 8601) or epoch-seconds ``timestamp``, ``count`` and ``confluence_pct``, and
optionally ``series``), or ``cellseg predict --csv`` output (its ``acquired_at`` column). Each
problem with the input is said on standard error, with what was done about it: records without
a time or with a value that is not a number are left out, records out of time order are
sorted, and of records at the same time the first is kept.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from cellseg.edge.errors import ConfigError
from cellseg.edge.growth.model import GrowthFit, GrowthSettings, fit_growth


@dataclass(frozen=True)
class Record:
    """One measurement: when its frame was taken (epoch s), its count and confluence."""

    at: float
    count: float
    confluence_pct: float


def _time(row: dict[str, Any]) -> float | None:
    acquired = row.get("acquired_at")
    if acquired:
        try:
            when = datetime.fromisoformat(str(acquired).replace("Z", "+00:00"))
        except ValueError:
            return None
        return when.timestamp() if when.tzinfo else None
    stamp = row.get("timestamp")
    try:
        return float(stamp) if stamp not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file") from e
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not a JSON object per line ({e.msg})") from e
        if isinstance(row, dict) and "error" not in row:  # predict's lines for images it could not read
            rows.append(row)
    return rows


def read_records(paths: list[Path], warn: IO[str]) -> dict[str, list[Record]]:
    """The records of every file, by series, in time order; each problem said on ``warn``."""
    by_series: dict[str, list[Record]] = defaultdict(list)
    untimed = bad = 0
    for path in paths:
        for row in _rows(path):
            at = _time(row)
            if at is None:
                untimed += 1
                continue
            try:
                count, conf = float(row["count"]), float(row["confluence_pct"])
            except (KeyError, TypeError, ValueError):
                bad += 1
                continue
            if not all(map(math.isfinite, (at, count, conf))) or count < 0 or conf < 0:
                bad += 1
                continue
            by_series[str(row.get("series") or "default")].append(Record(at, count, conf))
    if untimed:
        warn.write(f"cellseg growth: {untimed} records have no time (acquired_at or timestamp); left out\n")
    if bad:
        warn.write(f"cellseg growth: {bad} records have no usable count or confluence_pct; left out\n")
    if not by_series:
        raise ConfigError("no records with a time, a count and a confluence_pct: nothing to fit"
                          + (" (every record lacked acquired_at and timestamp)" if untimed else ""))  # fmt: skip
    ordered: dict[str, list[Record]] = {}
    for series, records in sorted(by_series.items()):
        if any(b.at < a.at for a, b in itertools.pairwise(records)):
            warn.write(f"cellseg growth: series {series}: records are not in time order; sorted by time\n")
        in_order = sorted(records, key=lambda r: r.at)
        kept = [r for i, r in enumerate(in_order) if i == 0 or r.at != in_order[i - 1].at]
        if len(kept) < len(in_order):
            warn.write(f"cellseg growth: series {series}: {len(in_order) - len(kept)} records repeat a time; "
                       "kept the first of each\n")  # fmt: skip
        ordered[series] = kept
    return ordered


def describe(series: str, fit: GrowthFit) -> str:
    d = fit.to_dict()
    head = f"{series}: {fit.status}"
    if fit.doubling_time_h is None:
        return f"{head} ({fit.reason})"
    low, high = d["doubling_time_ci95_h"]
    interval = f"{low if low is not None else '?'}-{high if high is not None else 'open'} h"
    text = (f"{head}, {d['model']} fit; doubling time {d['doubling_time_h']} h (95 %: {interval}), "
            f"growth rate {d['growth_rate_per_h']}/h, {fit.n_points} frames since {d['segment_start']}")  # fmt: skip
    if fit.n_outliers:
        text += f", {fit.n_outliers} set aside as outliers"
    if len(fit.segments) > 1:
        text += f"; {len(fit.segments) - 1} passage(s) found"
    if d["passage_eta"] is None:
        text += f"; confluence does not reach {fit.target_confluence_pct:g} % on this fit"
    else:
        ci = d["passage_eta_ci95"]
        band = f" (95 %: {ci[0]} to {ci[1] or 'open'})" if ci else ""
        text += f"; {fit.target_confluence_pct:g} % confluence at {d['passage_eta']}{band}"
    return text


def run_growth(
    paths: list[Path],
    settings: GrowthSettings,
    *,
    as_json: bool = False,
    plot: Path | None = None,
    report: Path | None = None,
    out: IO[str] | None = None,
    warn: IO[str] | None = None,
) -> int:
    """Fit each series in ``paths``; print the fits (text or one JSON object per series), draw
    them (``plot``) and write one HTML page of them all (``report``)."""
    out, warn = out or sys.stdout, warn or sys.stderr
    series = read_records(paths, warn)
    entries: list[tuple[str, dict[str, Any], bytes | None]] = []
    for name, records in series.items():
        t = np.array([r.at for r in records])
        counts = np.array([r.count for r in records])
        conf = np.array([r.confluence_pct for r in records])
        fit = fit_growth(t, counts, conf, settings)
        if as_json:
            out.write(json.dumps({"series": name, **fit.to_dict()}) + "\n")
        else:
            out.write(describe(name, fit) + "\n")
        if plot is not None:
            from cellseg.edge.growth.plot import plot_growth

            target = plot if len(series) == 1 else plot.with_name(f"{plot.stem}-{name}{plot.suffix}")
            plot_growth(fit, t, counts, conf, target, title=name if len(series) > 1 else "")
        if report is not None:
            from cellseg.edge.growth.plot import png_of

            entries.append((name, fit.to_dict(), png_of(fit, t, counts, conf, title=name)))
    if report is not None:
        from cellseg.edge.growth.report import html_report

        report.write_text(html_report(entries, [str(p) for p in paths]))
    return 0
