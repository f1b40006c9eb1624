"""The daemon's growth bookkeeping: each measurement into its series' history, the series
refitted, and what to publish (the fit; a ``passage_due`` event the first time a segment
reaches the target confluence).

A frame's series is the ``(?P<series>...)`` group of ``growth.series_from_name`` on its file
name, else ``growth.series``, else the device id. Its time is when it was taken; a frame with
no acquisition time (a recorded video) is placed at its processing time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg.edge.config import Config
from cellseg.edge.growth.history import History, Point
from cellseg.edge.growth.model import GrowthFit, GrowthSettings, fit_growth
from cellseg.edge.pipeline.types import Measurement


@dataclass(frozen=True)
class GrowthUpdate:
    series: str
    fit: dict[str, Any]
    passage_due_at: float | None  # set once per segment: when it first reached the target


class GrowthTracker:
    def __init__(self, config: Config) -> None:
        g = config.growth
        self.default_series = g.series or config.device_id
        self._pattern = re.compile(g.series_from_name) if g.series_from_name else None
        self.settings = GrowthSettings(target_confluence_pct=g.target_confluence_pct)
        self.history = History(config.state_dir / "history.sqlite", g.history_days)
        self._announced: dict[str, float] = {}  # series -> segment start whose passage_due was sent

    def series_of(self, source: str) -> str:
        if self._pattern is not None:
            m = self._pattern.search(Path(source).name)
            if m is not None and m.group("series"):
                return m.group("series")
        return self.default_series

    def observe(self, m: Measurement, series: str) -> GrowthUpdate:
        """Store ``m`` in ``series`` (:meth:`series_of` its source) and refit the series."""
        at = m.acquired_at if m.acquired_at is not None else m.timestamp
        self.history.add(Point(series, at, m.count, m.confluence_pct, m.seq, m.source))
        fit = self._fit(series)[0]
        due_at = None
        if fit.passage_due and fit.segment_start is not None and self._announced.get(series) != fit.segment_start:
            self._announced[series] = fit.segment_start
            due_at = at
        return GrowthUpdate(series, fit.to_dict(), due_at)

    def _fit(self, series: str) -> tuple[GrowthFit, Any, Any, Any]:
        """The fit of ``series``' history, and the (times, counts, confluences) it was made from."""
        t, counts, confluence = self.history.arrays(series)
        return fit_growth(t, counts, confluence, self.settings), t, counts, confluence

    def picture(self, series: str) -> tuple[bytes, int] | None:
        """The PNG of ``series``' growth and how many measurements it shows; None when it has none.
        DependencyError without matplotlib."""
        fit, t, counts, confluence = self._fit(series)
        if len(t) == 0:
            return None
        from cellseg.edge.growth.plot import png_of

        return png_of(fit, t, counts, confluence, title=series), len(t)

    def close(self) -> None:
        self.history.close()
