"""Fit the load forecaster Load(t) = a + b*R(t-1) + c*R(t-2) (`foretell train forecast`).

Input, one of:
- `--counts FILE`: lines `interval_end_s,requests` (what the proxy appends
  when `forecast.counts_path` is set; a header line and blank lines are
  ignored). Lines that end in the same interval of `--interval-s` are summed
  (each worker of a proxy writes its own), and only intervals that follow
  one another are fitted: a gap (a restart, the proxy down) is not read as
  one interval following another. Lines of a bare count, no time, are taken
  as consecutive intervals.
- `--data DIR`: telemetry; decisions (chosen records) are binned into
  intervals of `--interval-s` and divided by each file's sample rate, only
  while a proxy process was recording (the time between runs is a gap, as
  with counts). A sampled estimate: prefer counts when you have them.

Least squares on the first (1 - validation_fraction) of intervals; the
rest validate, against the persistence forecast R(t) = R(t-1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proxy.forecast import Coefficients
from train.dataset import Telemetry


class ForecastTrainError(Exception):
    pass


@dataclass(frozen=True)
class Counts:
    """Requests per interval in time order, and which of them follow their predecessor."""

    requests: np.ndarray
    follows: np.ndarray  # bool per interval: the one before it is the previous interval
    lines: int  # lines read (several per interval with several workers)

    @classmethod
    def consecutive(cls, requests: np.ndarray) -> Counts:
        """Counts of intervals that follow one another, in order, one line each."""
        r = np.asarray(requests, dtype=np.float64)
        return cls(r, np.ones(len(r), dtype=bool), len(r))


def read_counts(path: str | Path, interval_s: float) -> Counts:
    path = Path(path)
    ends: list[float] = []
    values: list[float] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(",")
        try:
            value = float(parts[-1])
            end_s = float(parts[0]) if len(parts) > 1 else math.nan
        except ValueError:
            if lineno == 1:  # a header
                continue
            raise ForecastTrainError(f"{path}:{lineno}: not a count: {line!r}") from None
        values.append(value)
        ends.append(end_s)
    r = np.asarray(values, dtype=np.float64)
    t = np.asarray(ends, dtype=np.float64)
    if len(r) == 0 or np.isnan(t).any():  # bare counts: consecutive, in file order
        return Counts.consecutive(r)
    # Interval number of each line; rounding absorbs the jitter of unaligned writers.
    index = np.rint((t - t.min()) / interval_s).astype(np.int64)
    intervals, which = np.unique(index, return_inverse=True)
    totals = np.bincount(which, weights=r)
    follows = np.concatenate([[False], np.diff(intervals) == 1])
    return Counts(totals, follows, len(r))


def counts_from_telemetry(data: Telemetry, interval_s: float) -> Counts:
    """Decisions per interval of `interval_s` from the first, divided by the sample rate:
    only intervals wholly inside a span when a proxy was recording (`Telemetry.spans`),
    so a restart or the days between two runs are a gap, not intervals of zero requests
    (and a span's partial first and last intervals are left out)."""
    chosen = data.chosen()
    if len(chosen) == 0:
        raise ForecastTrainError("no decisions in the telemetry")
    rate = float(np.mean(data.sample_rates)) if data.sample_rates else 1.0
    t = chosen["time_s"]
    t0 = float(t.min())
    bins = np.floor((t - t0) / interval_s).astype(np.int64)
    counts = np.bincount(bins).astype(np.float64)
    covered = np.zeros(len(counts), dtype=bool)
    for start_s, end_s in data.spans or [(t0, float(t.max()))]:
        # Intervals lo .. hi - 1 lie wholly inside [start_s, end_s].
        lo = math.ceil((start_s - t0) / interval_s - 1e-9)
        hi = math.floor((end_s - t0) / interval_s + 1e-9)
        covered[max(lo, 0):max(hi, 0)] = True
    kept = np.flatnonzero(covered)
    if len(kept) == 0:
        raise ForecastTrainError(
            f"no whole interval of {interval_s:g} s inside a run of the telemetry "
            f"({len(data.spans) or 1} run(s)): collect longer runs or lower --interval-s")
    follows = np.concatenate([[False], np.diff(kept) == 1])
    return Counts(counts[kept] / max(rate, 1e-9), follows, len(chosen))


def fit_forecast(counts: Counts, interval_s: float,
                 validation_fraction: float = 0.2) -> Coefficients:
    """Least squares over every interval whose two predecessors are the two intervals
    before it."""
    r, follows = counts.requests, counts.follows
    if len(r) < 8:
        raise ForecastTrainError(f"need at least 8 intervals, got {len(r)}")
    usable = follows[2:] & follows[1:-1]  # R(t), R(t-1), R(t-2) in a row
    if usable.sum() < 6:
        raise ForecastTrainError(
            f"only {int(usable.sum())} intervals follow two intervals of {interval_s:g} s "
            f"(of {len(r)}): are the counts {interval_s:g} s apart (--interval-s)?")
    y, r1, r2 = r[2:][usable], r[1:-1][usable], r[:-2][usable]
    design = np.column_stack([np.ones_like(r1), r1, r2])
    n = len(y)
    split = max(3, min(n - 1, round(n * (1 - validation_fraction))))
    coef, *_ = np.linalg.lstsq(design[:split], y[:split], rcond=None)
    a, b, c = (float(v) for v in coef)
    val_pred = design[split:] @ coef
    metrics = {
        "intervals": len(r),
        "fitted_intervals": n,
        "train_intervals": split,
        "validation_mae_requests": float(np.mean(np.abs(val_pred - y[split:]))),
        "persistence_mae_requests": float(np.mean(np.abs(r1[split:] - y[split:]))),
    }
    if not all(math.isfinite(v) for v in (a, b, c)):
        raise ForecastTrainError("the fit produced non-finite coefficients")
    return Coefficients(a, b, c, interval_s, metrics)
