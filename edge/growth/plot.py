"""The growth picture a biologist puts in a lab meeting: count and confluence against time, the
fit with its 95 % band, the segments (passages), the target confluence and the passage ETA."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from cellseg.edge.errors import DependencyError
from cellseg.edge.growth.model import Curve, GrowthFit


def _band(curve: Curve, t: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    values = np.array([curve(t, p) for p in curve.draws(200)])
    return np.percentile(values, 2.5, axis=0), np.percentile(values, 97.5, axis=0)


def png_of(
    fit: GrowthFit,
    times: npt.NDArray[np.float64],
    counts: npt.NDArray[np.float64],
    confluence_pct: npt.NDArray[np.float64],
    title: str = "",
) -> bytes:
    """The picture as PNG bytes (for ``cmd/growth_plot`` and the HTML report)."""
    buffer = io.BytesIO()
    plot_growth(fit, times, counts, confluence_pct, buffer, title=title)
    return buffer.getvalue()


def plot_growth(
    fit: GrowthFit,
    times: npt.NDArray[np.float64],
    counts: npt.NDArray[np.float64],
    confluence_pct: npt.NDArray[np.float64],
    path: Path | IO[bytes],
    *,
    title: str = "",
) -> None:
    """Write the picture of one series' fit to ``path`` (PNG, SVG or PDF by its suffix; a
    binary stream gets PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError as e:
        raise DependencyError("matplotlib", "plot", "drawing growth curves") from e

    def when(t: npt.NDArray[np.float64] | list[float]) -> list[datetime]:
        return [datetime.fromtimestamp(float(v), timezone.utc) for v in t]

    fig, (ax_count, ax_conf) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5), constrained_layout=True)
    end = max(float(times[-1]), fit.passage_eta or 0.0)
    if fit.passage_eta_ci95 and fit.passage_eta_ci95[1]:
        end = max(end, fit.passage_eta_ci95[1])
    for ax, values, curve, label in ((ax_count, counts, fit.count, "cells per frame"),
                                     (ax_conf, confluence_pct, fit.confluence, "confluence (%)")):  # fmt: skip
        in_fit = np.ones(len(times), bool)  # without a fit, every frame is simply measured
        if curve is not None and fit.segment_start is not None:
            first = int(np.searchsorted(times, fit.segment_start))
            in_fit[:] = False
            in_fit[first:] = curve.used
        ax.plot(when(times[in_fit]), values[in_fit], "o", color="tab:blue", ms=4, label="measured")
        if not in_fit.all():
            ax.plot(when(times[~in_fit]), values[~in_fit], "o", color="0.65", ms=4,
                    label="earlier segment or outlier")  # fmt: skip
        if curve is not None:
            grid = np.linspace(curve.t0, end, 300)
            low, high = _band(curve, grid)
            ax.fill_between(when(grid), low, high, color="tab:orange", alpha=0.25, lw=0, label="95 % band")
            ax.plot(when(grid), curve(grid), color="tab:orange", lw=2, label=f"{curve.model} fit")
        for start, _ in fit.segments[1:]:
            ax.axvline(when([start])[0], color="tab:red", ls="--", lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_count.set_yscale("log")
    ax_count.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax_count.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax_conf.axhline(fit.target_confluence_pct, color="tab:green", ls=":", lw=1.5,
                    label=f"target {fit.target_confluence_pct:g} %")  # fmt: skip
    if fit.passage_eta is not None:
        ax_conf.axvline(when([fit.passage_eta])[0], color="tab:green", lw=1.5, label="passage ETA")
        if fit.passage_eta_ci95 and fit.passage_eta_ci95[0] and fit.passage_eta_ci95[1]:
            ax_conf.axvspan(*when(list(fit.passage_eta_ci95)), color="tab:green", alpha=0.12)  # type: ignore[arg-type]
    ax_conf.set_ylim(0, 100)
    ax_conf.legend(loc="upper left", fontsize=8)
    ax_count.legend(loc="upper left", fontsize=8)
    ax_conf.xaxis.set_major_formatter(mdates.DateFormatter("%d %b\n%H:%M"))  # type: ignore[no-untyped-call]
    ax_conf.set_xlabel("acquisition time (UTC)")
    doubling = f"doubling time {fit.doubling_time_h:.1f} h" if fit.doubling_time_h else fit.reason
    ax_count.set_title(f"{title + ': ' if title else ''}{fit.status}; {doubling}", fontsize=11)
    fig.savefig(path, dpi=130, format=None if isinstance(path, Path) else "png")
    plt.close(fig)
