"""Growth fits on series with known parameters, the real T98G time-lapse end to end, and what
bad input gets.

The synthetic series are what a live-cell monitor sees: exponential growth (doubling time 12 to
40 h) with 3-5 % multiplicative noise on count and confluence, frames at irregular intervals
(0.4 to 1.6 h apart) with an 8-hour gap, two single frames far too low (a bubble, lost focus),
and in half the cases a passage (the culture split to 15 %) partway through. Pass: doubling time
within 5 %, passage ETA within 10 % of the time remaining, the passage found, the outliers left out.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cellseg.edge.capture.acquisition import iso_time
from cellseg.edge.errors import ConfigError
from cellseg.edge.growth.model import HOUR, GrowthSettings, fit_growth
from cellseg.edge.tools.growth import run_growth

T0 = 1_790_000_000.0  # 2026-09-21


@dataclass
class Series:
    t: np.ndarray
    count: np.ndarray
    confluence: np.ndarray
    outliers: list[int]
    passage_at: int | None
    eta: float  # when confluence truly reaches 70 %


def synthetic(doubling_h: float, noise: float, seed: int, passage: bool) -> Series:
    rng = np.random.default_rng(seed)
    rate = math.log(2) / doubling_h
    growth_span = max(60.0, 2.2 * doubling_h)  # the segment the fit sees
    span = growth_span * (1.6 if passage else 1.0)
    h = np.cumsum(rng.uniform(0.4, 1.6, int(span / 0.9) + 20))
    h = h[h <= span]
    gap = span * 0.55
    h = h[(h < gap) | (h > gap + 8.0)]  # 8 hours with no frame (the incubator door, a network outage)
    start = span - growth_span if passage else 0.0
    conf_end = 40.0
    conf = conf_end * np.exp(rate * (h - span))  # confluence follows the count
    passage_at = None
    if passage:
        passage_at = int(np.searchsorted(h, start))
        conf[:passage_at] = conf_end * np.exp(rate * (h[:passage_at] - span)) / 0.15 * np.exp(-rate * 0)
        # before the split: the same culture, 1/0.15 times denser at the same growth phase
        conf[:passage_at] = np.minimum(conf[:passage_at], 95.0)
    count = conf * 25.0
    count = count * (1 + noise * rng.standard_normal(len(h)))
    conf = conf * (1 + noise * rng.standard_normal(len(h)))
    outliers = [int(len(h) * 0.7), int(len(h) * 0.85)]
    for i in outliers:
        count[i] *= 0.35
        conf[i] *= 0.35
    eta = T0 + (span + math.log(70.0 / conf_end) / rate) * HOUR
    return Series(T0 + h * HOUR, np.round(count), conf, outliers, passage_at, eta)


CASES = [(d, n, passage) for d in (12.0, 18.0, 24.0, 30.0, 40.0) for n in (0.03, 0.05) for passage in (False, True)]


@pytest.mark.parametrize(("doubling_h", "noise", "passage"), CASES)
def test_known_growth_is_recovered(doubling_h: float, noise: float, passage: bool) -> None:
    s = synthetic(doubling_h, noise, seed=int(doubling_h * 10 + noise * 100), passage=passage)
    fit = fit_growth(s.t, s.count, s.confluence)
    assert fit.status == "growing" and fit.doubling_time_h is not None and fit.passage_eta is not None
    error = fit.doubling_time_h / doubling_h - 1
    remaining = s.eta - s.t[-1]
    eta_error = (fit.passage_eta - s.eta) / remaining
    low, high = fit.doubling_time_ci95_h or (None, None)
    assert low is not None and high is not None
    print(f"| {doubling_h:.0f} | {noise:.0%} | {'yes' if passage else 'no'} | {fit.doubling_time_h:.2f} ({error:+.1%}) "
          f"| {low:.2f}-{high:.2f} | {eta_error:+.1%} of {remaining / HOUR:.1f} h | {fit.n_outliers} |")  # fmt: skip
    assert abs(error) < 0.05
    assert abs(eta_error) < 0.10
    assert low < fit.doubling_time_h < high
    if passage:
        assert len(fit.segments) == 2 and fit.segment_start == s.t[s.passage_at]
    else:
        assert len(fit.segments) == 1 and fit.segment_start == s.t[0]
    assert fit.count is not None
    first = int(np.searchsorted(s.t, fit.segment_start))
    for i in s.outliers:
        assert not fit.count.used[i - first], f"outlier frame {i} was used"


def test_a_single_low_frame_is_an_outlier_not_a_passage() -> None:
    s = synthetic(24.0, 0.04, seed=3, passage=False)
    fit = fit_growth(s.t, s.count, s.confluence)
    assert len(fit.segments) == 1 and fit.n_outliers >= 2


def test_a_culture_levelling_off_below_the_target_is_a_plateau_with_no_eta() -> None:
    rng = np.random.default_rng(11)
    h = np.cumsum(rng.uniform(0.5, 1.5, 140))
    conf = 55.0 / (1 + np.exp(-math.log(2) / 20.0 * (h - 40.0))) * (1 + 0.03 * rng.standard_normal(len(h)))
    fit = fit_growth(T0 + h * HOUR, conf * 25.0, conf)
    assert fit.count is not None and fit.count.model == "logistic"
    assert fit.status == "plateau" and fit.passage_eta is None
    assert fit.doubling_time_h is not None and abs(fit.doubling_time_h / 20.0 - 1) < 0.10  # the intrinsic rate


def test_a_dying_culture_is_declining() -> None:
    h = np.arange(0.0, 30.0, 1.0)
    count = 800.0 * np.exp(-0.03 * h)
    fit = fit_growth(T0 + h * HOUR, count, count / 25.0)
    assert fit.status == "declining" and fit.doubling_time_h is None and fit.passage_eta is None


def _lines(records: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _run(tmp_path: Path, text: str, name: str = "m.jsonl") -> tuple[list[dict[str, object]], str]:
    path = tmp_path / name
    path.write_text(text)
    out, warn = io.StringIO(), io.StringIO()
    run_growth([path], GrowthSettings(), as_json=True, out=out, warn=warn)
    return [json.loads(line) for line in out.getvalue().splitlines()], warn.getvalue()


def test_a_backlog_keeps_its_acquisition_times(tmp_path: Path) -> None:
    """Measurements replayed after an outage were all processed within seconds; the curve is
    drawn against when their frames were taken, and comes out as without the outage."""
    s = synthetic(24.0, 0.04, seed=9, passage=False)
    taken = [{"acquired_at": iso_time(t), "count": c, "confluence_pct": f}
             for t, c, f in zip(s.t, s.count, s.confluence, strict=True)]  # fmt: skip
    replayed = [{**r, "timestamp": T0 + 100 * HOUR + i * 0.5, "historical": True} for i, r in enumerate(taken)]
    (plain,), _ = _run(tmp_path, _lines(taken), "taken.jsonl")
    (backlog,), _ = _run(tmp_path, _lines(replayed), "replayed.jsonl")
    assert backlog == plain and plain["status"] == "growing"


def test_bad_input_gets_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="every record lacked acquired_at and timestamp"):
        _run(tmp_path, _lines([{"count": 5, "confluence_pct": 1.0}] * 3))
    with pytest.raises(ConfigError, match=r"m.jsonl:2: not a JSON object per line"):
        _run(tmp_path, '{"timestamp": 1, "count": 1, "confluence_pct": 1}\n{"timestamp": \n')
    s = synthetic(24.0, 0.03, seed=4, passage=False)
    records = [{"timestamp": float(t), "count": float(c), "confluence_pct": float(f)}
               for t, c, f in zip(s.t, s.count, s.confluence, strict=True)]  # fmt: skip
    (ordered,), _ = _run(tmp_path, _lines(records))
    shuffled = [*records[::-1], records[5], {**records[7], "count": "nan"}, {"timestamp": 1.0, "count": None}]
    (fit,), warned = _run(tmp_path, _lines(shuffled))
    assert "not in time order; sorted by time" in warned
    assert "1 records repeat a time; kept the first of each" in warned
    assert "2 records have no usable count or confluence_pct; left out" in warned
    assert fit == ordered  # what was wrong with the input changed nothing else
    (single,), _ = _run(tmp_path, _lines(records[:1]))
    assert single["status"] == "insufficient data" and "has 1 over 0.0 h" in str(single["reason"])


def test_the_t98g_time_lapse_from_frames_to_the_plot(data_root: Path, tmp_path: Path) -> None:
    """The whole path as a user runs it: predict the 12 real frames (10.2 min apart, times from
    their names), then the growth fit and its picture. Two hours cannot give a doubling time of
    a day or so, and the fit says so."""
    frames = data_root / "t98g_timelapse" / "frames"
    measured = tmp_path / "t98g.jsonl"
    with open(measured, "w") as out:
        subprocess.run([sys.executable, "-m", "cellseg", "predict", str(frames), "--json", "--time-from-name",
                        r"t(?P<index>\d+)\.tif$", "--frame-interval", "612", "--time-start", "2018-01-01T09:00:00",
                        "--timezone", "Europe/Berlin"], stdout=out, check=True, timeout=300)  # fmt: skip
    picture = tmp_path / "t98g.png"
    done = subprocess.run([sys.executable, "-m", "cellseg", "growth", str(measured), "--json", "--plot", str(picture)],
                          capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    fit = json.loads(done.stdout)
    assert fit["status"] == "insufficient data"
    assert fit["reason"] == "needs at least 6 frames over 6 h in the series; has 12 over 1.9 h"
    assert fit["segment_start"] == "2018-01-01T08:10:12.000+00:00" and fit["doubling_time_h"] is None
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000


def test_an_html_report_holds_everything_in_one_file(tmp_path: Path) -> None:
    s = synthetic(24.0, 0.04, seed=12, passage=True)
    rows = [{"acquired_at": iso_time(t), "count": c, "confluence_pct": f, "series": "flask-1"}
            for t, c, f in zip(s.t, s.count, s.confluence, strict=True)]  # fmt: skip
    source = tmp_path / "history.jsonl"
    source.write_text(_lines(rows))
    page = tmp_path / "report.html"
    run_growth([source], GrowthSettings(), report=page, out=io.StringIO(), warn=io.StringIO())
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "Series flask-1" in text
    assert "data:image/png;base64," in text and "src='http" not in text  # self-contained
    assert "<th>doubling time (h)</th><td>2" in text and "<td class='status'>growing</td>" in text
