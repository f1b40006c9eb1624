"""Benchmark: how long the growth fit takes after a new frame, by history length.

The fit has no incremental state: after each frame the newest segment is fitted again (robust
exponential of count and confluence, a logistic when the curve bends, the passage ETA from
400 parameter draws), so its cost is that of a whole fit. Series are synthetic (doubling time
24 h, 4 % noise, frames every 0.4-1.6 h) — free growth, and a culture bending towards a plateau.

    python bench/growth.py [--repeats 50] [--plot docs/growth.png]

Prints a table (median and 95th percentile ms); makes no assertion. ``--plot`` also draws the
README's example: five days of a culture with a passage, an 8-hour gap and a bad frame.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from cellseg.edge.device import device_name
from cellseg.edge.growth.model import HOUR, fit_growth

T0 = 1_790_000_000.0


def series(n: int, bending: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = np.cumsum(rng.uniform(0.4, 1.6, n))
    rate = math.log(2) / 24.0
    # A culture bending towards a plateau of 85 %, or one growing freely (40 % at its newest frame).
    conf = 85.0 / (1 + np.exp(-rate * (h - 0.8 * h[-1]))) if bending else 40.0 * np.exp(rate * (h - h[-1]))
    conf = conf * (1 + 0.04 * rng.standard_normal(n))
    return T0 + h * HOUR, conf * 25.0, conf


def example(path: Path) -> None:
    """Five days of one culture: grown, split to 15 % on day 3, an 8-hour gap, a bad frame."""
    from cellseg.edge.growth.plot import plot_growth

    rng = np.random.default_rng(2026)
    h = np.cumsum(rng.uniform(0.6, 1.4, 100))
    h = h[(h < 70) | (h > 78)]
    rate = math.log(2) / 21.0
    conf = np.where(h < 52, 9.0 * np.exp(rate * h), 9.0 * np.exp(rate * 52) * 0.15 * np.exp(rate * (h - 52)))
    conf = conf * (1 + 0.04 * rng.standard_normal(len(h)))
    count = np.round(conf * 23.0 * (1 + 0.03 * rng.standard_normal(len(h))))
    bad = int(np.searchsorted(h, 90.0))
    conf[bad] *= 0.4
    count[bad] *= 0.4
    t = T0 + h * HOUR
    fit = fit_growth(t, count, conf)
    plot_growth(fit, t, count, conf, path, title="example (synthetic): doubling 21 h, split on day 3")
    print(f"wrote {path}: {fit.status}, doubling time {fit.doubling_time_h:.1f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--plot", type=Path, help="also write the README's example picture here")
    args = parser.parse_args()
    print(f"growth fit after a new frame, {device_name()}, Python {platform.python_version()}")
    print(f"{'history':>8} | {'curve':<8} | {'model':<11} | {'median ms':>9} | {'p95 ms':>7}")
    print("-" * 56)
    for n in (100, 500, 2000):
        for bending in (False, True):
            t, count, conf = series(n, bending)
            fit = fit_growth(t, count, conf)  # warm: SciPy's first call imports and compiles
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fit = fit_growth(t, count, conf)
                times.append((time.perf_counter() - start) * 1e3)
            model = fit.count.model if fit.count else "-"
            p95 = statistics.quantiles(times, n=20)[-1]
            print(f"{n:>8} | {'bending' if bending else 'free':<8} | {model:<11} | {statistics.median(times):>9.2f} | "
                  f"{p95:>7.2f}")  # fmt: skip
    if args.plot is not None:
        example(args.plot)


if __name__ == "__main__":
    main()
