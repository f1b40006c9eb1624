"""One self-contained HTML page of growth fits (``cellseg growth --html``): per series the
picture (embedded), the numbers, and how they were made; no file beside it, no network."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from typing import Any

from cellseg import __version__

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; text-align: left; }
.status { font-weight: bold; } img { max-width: 100%; }
footer { margin-top: 3em; font-size: 0.85em; color: #666; }
"""

_ROWS = (
    ("status", "status"),
    ("reason", "why"),
    ("model", "model"),
    ("doubling_time_h", "doubling time (h)"),
    ("doubling_time_ci95_h", "95 % interval (h)"),
    ("growth_rate_per_h", "growth rate (1/h)"),
    ("target_confluence_pct", "target confluence (%)"),
    ("passage_eta", "target reached at"),
    ("passage_eta_ci95", "95 % interval"),
    ("segment_start", "segment started"),
    ("n_points", "frames in the fit"),
    ("n_outliers", "frames set aside"),
)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return " to ".join("open" if v is None else str(v) for v in value)
    return str(value)


def html_report(entries: list[tuple[str, dict[str, Any], bytes | None]], sources: list[str]) -> str:
    """``entries``: (series, fit as :meth:`GrowthFit.to_dict`, its PNG or None)."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cellseg growth report</title>"
             f"<style>{_STYLE}</style></head><body><h1>Growth report</h1>"
             f"<p>From {html.escape(', '.join(sources))}.</p>"]  # fmt: skip
    for series, fit, png in entries:
        parts.append(f"<h2>Series {html.escape(series)}</h2><table>")
        for key, label in _ROWS:
            value = html.escape(_cell(fit.get(key)))
            css = " class='status'" if key == "status" else ""
            parts.append(f"<tr><th>{label}</th><td{css}>{value}</td></tr>")
        parts.append("</table>")
        if png is not None:
            encoded = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt='growth of series {html.escape(series)}' src='data:image/png;base64,{encoded}'>")
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts.append(f"<footer>cellseg {html.escape(__version__)}, {made}. Times are acquisition times (UTC). The "
                 "doubling time is ln 2 over the fitted growth rate of the cell count; its interval and the "
                 "target time's come from the fit's uncertainty.</footer></body></html>")  # fmt: skip
    return "".join(parts)
