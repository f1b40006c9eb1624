"""Growth of one culture from its measurements: the current growth phase, doubling time with
its 95 % interval, and when confluence will reach the passage target.

The series is cut into segments at each passage or medium change: a drop of count (or
confluence) below ``passage_drop`` of the recent level that the next frame confirms (a single
low frame is an outlier: a bubble, a lost focus, a lid change, and does not cut). In the newest
segment, each of count and confluence is fitted on a log scale; frames far from the median of
their neighbours are set aside first (model-free, so neither a bad frame nor a bending curve
fools it), and the rest fitted by least squares (SciPy's ``least_squares`` for the logistic),
from which the intervals come:

- exponential, ``log y = a + r t``, while the culture grows freely;
- logistic, ``y = K / (1 + exp(-r (t - t_mid)))``, once it bends towards a plateau (chosen
  when it fits clearly better: its AIC lower by more than ``LOGISTIC_AIC_GAIN``).

``r`` is the growth rate (per hour, of the count), ``ln 2 / r`` the doubling time; the passage
ETA is the time the confluence fit reaches the target, its interval from 400 draws of the fit's
parameters. Too little data for a doubling time is said so, with what is missing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cellseg.edge.capture.acquisition import iso_time
from cellseg.edge.errors import ContractError

HOUR = 3600.0
LOGISTIC_AIC_GAIN = 10.0
_DRAWS = 400


@dataclass(frozen=True)
class GrowthSettings:
    """Attributes:
    target_confluence_pct: the confluence at which the culture is due for passage.
    min_points: frames the current segment needs before a doubling time is given.
    min_span_h: hours it must span (a doubling of 12-40 h is not seen in 2 h).
    passage_drop: a frame below this fraction of the recent level, confirmed by the next, starts
        a new segment.
    outlier_log: frames off the robust fit by more than this (natural log: 0.3 is 35 %) are set aside.
    """

    target_confluence_pct: float = 70.0
    min_points: int = 6
    min_span_h: float = 6.0
    passage_drop: float = 0.5
    outlier_log: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 < self.target_confluence_pct <= 100.0:
            raise ContractError(f"target confluence must be in (0, 100] %, got {self.target_confluence_pct}")


@dataclass(frozen=True)
class Curve:
    """One fitted quantity: the model, its parameters and their covariance (for bands), the
    hour the time axis starts at (epoch s), and which points it used."""

    model: str  # exponential | logistic
    params: tuple[float, ...]
    cov: npt.NDArray[np.float64]
    t0: float
    used: npt.NDArray[np.bool_]

    def __call__(self, t: npt.NDArray[np.float64], params: Sequence[float] | None = None) -> npt.NDArray[np.float64]:
        """The fitted value at epoch seconds ``t``."""
        h = (np.asarray(t, np.float64) - self.t0) / HOUR
        p = self.params if params is None else params
        if self.model == "exponential":
            return np.asarray(np.exp(p[0] + p[1] * h))
        return np.asarray(p[0] / (1.0 + np.exp(-p[1] * (h - p[2]))))

    @property
    def rate_per_h(self) -> float:
        return float(self.params[1])

    def rate_se(self) -> float:
        return float(math.sqrt(max(self.cov[1, 1], 0.0)))

    def draws(self, n: int = _DRAWS, seed: int = 0) -> npt.NDArray[np.float64]:
        rng = np.random.default_rng(seed)
        return np.asarray(rng.multivariate_normal(np.asarray(self.params), self.cov, size=n, method="eigh"))

    def reaches_each(self, level: float, draws: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """:meth:`reaches` for each row of parameters in ``draws``; inf where it never does."""
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.model == "exponential":
                a, r = draws[:, 0], draws[:, 1]
                h = np.where(r > 0, (math.log(level) - a) / r, np.inf)
            else:
                k, r, mid = draws[:, 0], draws[:, 1], draws[:, 2]
                h = np.where((k > level) & (r > 0), mid + np.log(level / (k - level)) / r, np.inf)
        return np.asarray(self.t0 + h * HOUR, np.float64)

    def reaches(self, level: float, params: Sequence[float] | None = None) -> float | None:
        """Epoch seconds at which the curve reaches ``level``; None when it never does."""
        p = self.params if params is None else params
        if self.model == "exponential":
            if p[1] <= 0:
                return None
            h = (math.log(level) - p[0]) / p[1]
        else:
            k, r, mid = p
            if k <= level or r <= 0:
                return None
            h = mid + math.log(level / (k - level)) / r
        return self.t0 + h * HOUR


@dataclass(frozen=True)
class GrowthFit:
    status: str  # growing | plateau | declining | insufficient data
    reason: str
    target_confluence_pct: float
    n_points: int
    n_outliers: int
    segment_start: float | None
    segments: list[tuple[float, float]]
    count: Curve | None = None
    confluence: Curve | None = None
    growth_rate_per_h: float | None = None
    doubling_time_h: float | None = None
    doubling_time_ci95_h: tuple[float | None, float | None] | None = None
    passage_eta: float | None = None
    passage_eta_ci95: tuple[float | None, float | None] | None = None
    passage_due: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def iso(t: float | None) -> str | None:
            return iso_time(t) if t is not None else None

        def rounded(v: float | None, digits: int = 3) -> float | None:
            return None if v is None or not math.isfinite(v) else round(v, digits)

        return {
            "status": self.status,
            "reason": self.reason,
            "model": self.count.model if self.count else None,
            "growth_rate_per_h": rounded(self.growth_rate_per_h, 5),
            "doubling_time_h": rounded(self.doubling_time_h, 2),
            "doubling_time_ci95_h": [rounded(v, 2) for v in self.doubling_time_ci95_h]
            if self.doubling_time_ci95_h else None,
            "target_confluence_pct": self.target_confluence_pct,
            "passage_eta": iso(self.passage_eta),
            "passage_eta_ci95": [iso(v) for v in self.passage_eta_ci95] if self.passage_eta_ci95 else None,
            "passage_due": self.passage_due,
            "segment_start": iso(self.segment_start),
            "segments": [[iso(a), iso(b)] for a, b in self.segments],
            "n_points": self.n_points,
            "n_outliers": self.n_outliers,
            **self.extra,
        }  # fmt: skip


def _check(t: npt.NDArray[np.float64], count: npt.NDArray[np.float64], conf: npt.NDArray[np.float64]) -> None:
    if not (t.shape == count.shape == conf.shape) or t.ndim != 1:
        raise ContractError("times, counts and confluences must be 1-D and of one length")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(count)) and np.all(np.isfinite(conf))):
        raise ContractError("times, counts and confluences must be finite (no NaN)")
    if np.any(np.diff(t) <= 0):
        raise ContractError("times must increase strictly (sort them and drop duplicates first)")


def _median3(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], c: npt.NDArray[np.float64]) -> Any:
    return a + b + c - np.maximum(np.maximum(a, b), c) - np.minimum(np.minimum(a, b), c)


def segment_starts(values: npt.NDArray[np.float64], drop: float, window: int = 3) -> list[int]:
    """Indices where a new segment begins: 0, and each confirmed drop below ``drop`` x the median
    of the previous ``window`` frames of the running segment."""
    v = np.asarray(values, np.float64)
    if len(v) < 3:
        return [0]
    # Candidates first, against the previous three frames whatever their segment (vectorised: a
    # history of thousands is walked in microseconds); then each is checked in order against its
    # own segment's frames only.
    padded = np.concatenate([np.full(3, v[0]), v])
    level = _median3(padded[:-3], padded[1:-2], padded[2:-1])
    low = v < drop * level
    candidates = np.flatnonzero(low[1:-1] & (v[2:] < drop * level[1:-1])) + 1
    starts = [0]
    for i in candidates.tolist():
        recent = sorted(float(x) for x in v[max(starts[-1], i - window) : i])
        if not recent:
            continue
        mid = len(recent) // 2
        median = recent[mid] if len(recent) % 2 else (recent[mid - 1] + recent[mid]) / 2
        if median > 0 and v[i] < drop * median and v[i + 1] < drop * median:
            starts.append(i)
    return starts


def _local_outliers(logy: npt.NDArray[np.float64], limit: float, half: int = 3) -> npt.NDArray[np.bool_]:
    """Frames further than ``limit`` (log scale) from the median of their neighbourhood (three
    frames each side, reflected at the ends): a model-free test, so a culture bending towards
    its plateau does not look like a run of outliers to an exponential."""
    if len(logy) < 2 * half + 1:
        return np.zeros(len(logy), bool)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(logy, half, mode="reflect"), 2 * half + 1)
    return np.asarray(np.abs(logy - np.median(windows, axis=1)) > limit)


def _ols(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]:
    """Least squares ``y ~ x @ beta``: beta, its covariance, the residual sum of squares."""
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ beta
    sse = float(residual @ residual)
    dof = max(len(y) - x.shape[1], 1)
    try:
        cov = np.linalg.inv(x.T @ x) * (sse / dof)
    except np.linalg.LinAlgError:
        cov = np.full((x.shape[1], x.shape[1]), np.inf)
    return np.asarray(beta, np.float64), np.asarray(cov, np.float64), sse


def _bends(h: npt.NDArray[np.float64], logy: npt.NDArray[np.float64]) -> bool:
    """Whether log y bends down (a significantly negative quadratic term): only then is a
    logistic fit worth trying."""
    if len(h) < 8:
        return False
    centred = (h - h.mean()) / max(float(h.std()), 1e-9)
    beta, cov, _ = _ols(np.column_stack([np.ones_like(h), centred, centred**2]), logy)
    se = math.sqrt(cov[2, 2]) if math.isfinite(cov[2, 2]) and cov[2, 2] > 0 else math.inf
    return bool(beta[2] < 0 and -beta[2] / se > 3.0)


def _fit(t: npt.NDArray[np.float64], y: npt.NDArray[np.float64], settings: GrowthSettings) -> Curve | None:
    """The better of an exponential and a logistic fit of ``y`` (> 0) against ``t``, frames far
    from their neighbours left out."""
    positive = y > 0
    if positive.sum() < 3:
        return None
    t0 = float(t[0])
    h = (t - t0) / HOUR
    logy = np.log(np.where(positive, y, 1.0))
    used = positive.copy()
    used[positive] = ~_local_outliers(logy[positive], settings.outlier_log)
    if used.sum() < 3:
        return None
    hu, lu = h[used], logy[used]
    beta, cov, sse_exp = _ols(np.column_stack([np.ones_like(hu), hu]), lu)
    best = Curve("exponential", (float(beta[0]), float(beta[1])), cov, t0, used)
    if not _bends(hu, lu):
        return best
    logistic = _logistic(hu, lu, float(beta[1]))
    if logistic is None:
        return best
    params, cov_log, sse_log = logistic
    n = len(hu)
    aic_exp = n * math.log(max(sse_exp, 1e-300) / n) + 2 * 2
    aic_log = n * math.log(max(sse_log, 1e-300) / n) + 2 * 3
    if aic_exp - aic_log > LOGISTIC_AIC_GAIN:
        return Curve("logistic", params, cov_log, t0, used)
    return best


def _logistic(
    h: npt.NDArray[np.float64], logy: npt.NDArray[np.float64], rate: float
) -> tuple[tuple[float, float, float], npt.NDArray[np.float64], float] | None:
    """``log y = log K - log(1 + exp(-r (h - mid)))`` by least squares: parameters, their
    covariance and the residual sum of squares; None when it does not converge."""
    from scipy.optimize import least_squares

    def residual(p: npt.NDArray[np.float64]) -> Any:
        return np.log(p[0]) - np.log1p(np.exp(-p[1] * (h - p[2]))) - logy

    def jacobian(p: npt.NDArray[np.float64]) -> Any:
        e = np.exp(-p[1] * (h - p[2]))
        w = e / (1.0 + e)
        return np.column_stack([np.full_like(h, 1.0 / p[0]), w * (h - p[2]), -w * p[1]])

    top = float(np.exp(logy.max()))
    try:
        fit = least_squares(residual, [top * 1.5, max(rate, 1e-3), float(h.max())], jac=jacobian,
                            bounds=([top * 0.8, 1e-4, -1e4], [top * 50.0, 5.0, 1e4]))  # fmt: skip
    except ValueError:
        return None
    if not fit.success:
        return None
    sse = float(fit.fun @ fit.fun)
    j = np.asarray(fit.jac, np.float64)
    try:
        cov = np.linalg.inv(j.T @ j) * (sse / max(len(h) - 3, 1))
    except np.linalg.LinAlgError:
        return None
    return (float(fit.x[0]), float(fit.x[1]), float(fit.x[2])), cov, sse


Values = Sequence[float] | npt.NDArray[np.float64]


def fit_growth(
    times: Values, counts: Values, confluence_pct: Values, settings: GrowthSettings | None = None
) -> GrowthFit:
    """The growth of one series (times in epoch seconds, strictly increasing)."""
    from scipy.stats import t as student_t

    s = settings or GrowthSettings()
    t = np.asarray(times, np.float64)
    count = np.asarray(counts, np.float64)
    conf = np.asarray(confluence_pct, np.float64)
    _check(t, count, conf)
    if len(t) == 0:
        return GrowthFit("insufficient data", "no measurements", s.target_confluence_pct, 0, 0, None, [])
    level = np.where(count > 0, count, conf)
    starts = segment_starts(level, s.passage_drop)
    bounds = [*starts, len(t)]
    segments = [(float(t[a]), float(t[b - 1])) for a, b in itertools.pairwise(bounds)]
    first = starts[-1]
    st, sc, sf = t[first:], count[first:], conf[first:]
    span_h = (st[-1] - st[0]) / HOUR if len(st) > 1 else 0.0
    due = bool(sf[-1] >= s.target_confluence_pct)  # refined by the fit below, when there is one
    base = GrowthFit("insufficient data", "", s.target_confluence_pct, len(st), 0, float(st[0]), segments,
                     passage_due=due)  # fmt: skip
    if len(st) < s.min_points or span_h < s.min_span_h:
        since = "since the last passage" if first > 0 else "in the series"
        reason = (f"needs at least {s.min_points} frames over {s.min_span_h:g} h {since}; "
                  f"has {len(st)} over {span_h:.1f} h")  # fmt: skip
        return GrowthFit(**{**base.__dict__, "reason": reason})
    count_curve = _fit(st, sc, s)
    conf_curve = _fit(st, sf, s)
    growth = count_curve or conf_curve
    if growth is None:
        return GrowthFit(**{**base.__dict__, "reason": "too few frames with cells to fit"})
    rate, se = growth.rate_per_h, growth.rate_se()
    q = float(student_t.ppf(0.975, max(int(growth.used.sum()) - len(growth.params), 1)))
    low, high = rate - q * se, rate + q * se
    doubling = math.log(2) / rate if rate > 0 else None
    doubling_ci = (math.log(2) / high if high > 0 else None, math.log(2) / low if low > 0 else None)
    eta, eta_ci = _passage(conf_curve, sf, st, s.target_confluence_pct)
    outliers = len(st) - int(growth.used.sum())
    if growth.model == "logistic" and float(growth(st[-1:])[0]) >= 0.9 * growth.params[0]:
        status, reason = "plateau", "the fit has levelled off near its ceiling"
    elif low > 0:
        status, reason = "growing", f"{growth.model} growth"
    elif high < 0:
        status, reason = "declining", "the count falls"
    else:
        status, reason = "plateau", "no significant growth"
    if conf_curve is not None:  # the fit's value now, not one noisy frame
        due = bool(float(conf_curve(st[-1:])[0]) >= s.target_confluence_pct)
    return GrowthFit(
        status, reason, s.target_confluence_pct, int(growth.used.sum()), outliers, float(st[0]), segments,
        count_curve, conf_curve, rate, doubling, doubling_ci, eta, eta_ci, due,
    )  # fmt: skip


def _passage(
    curve: Curve | None, conf: npt.NDArray[np.float64], t: npt.NDArray[np.float64], target: float
) -> tuple[float | None, tuple[float | None, float | None] | None]:
    """When the confluence fit reaches ``target`` (in the past when it has), with the 2.5 and
    97.5 percentiles over draws of its parameters; without a fit, the first frame at or above it."""
    if curve is None:
        above = np.flatnonzero(conf >= target)
        return (float(t[above[0]]) if above.size else None), None
    eta = curve.reaches(target)
    if eta is None:
        return None, None
    found = curve.reaches_each(target, curve.draws())
    reached = found[np.isfinite(found)]
    if reached.size < len(found) * 0.9:  # many draws never get there: the upper bound is open
        return eta, (float(np.percentile(reached, 2.5)) if reached.size else None, None)
    return eta, (float(np.percentile(reached, 2.5)), float(np.percentile(reached, 97.5)))
