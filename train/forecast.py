"""Fit the load forecaster Load(t) = a + b*R(t-1) + c*R(t-2) (`foretell train forecast`).

Input, one of:
- `--counts FILE`: lines `interval_end_s,requests` (what the proxy appends
  when `forecast.counts_path` is set; a header line and blank lines are
  ignored). Intervals must be consecutive, of the configured length.
- `--data DIR`: telemetry; decisions (chosen records) are binned into
  intervals of `--interval-s` and divided by each file's sample rate. A
  sampled estimate: prefer counts when you have them.

Least squares on the first (1 - validation_fraction) of intervals; the
rest validate, against the persistence forecast R(t) = R(t-1).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from proxy.forecast import Coefficients
from train.dataset import Telemetry


class ForecastTrainError(Exception):
    pass


def read_counts(path: str | Path) -> np.ndarray:
    path = Path(path)
    values = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(",")
        try:
            values.append(float(parts[-1]))
        except ValueError:
            if lineno == 1:  # a header
                continue
            raise ForecastTrainError(f"{path}:{lineno}: not a count: {line!r}") from None
    return np.asarray(values, dtype=np.float64)


def counts_from_telemetry(data: Telemetry, interval_s: float) -> np.ndarray:
    chosen = data.chosen()
    if len(chosen) == 0:
        raise ForecastTrainError("no decisions in the telemetry")
    rate = float(np.mean(data.sample_rates)) if data.sample_rates else 1.0
    t = chosen["time_s"]
    bins = np.floor((t - t.min()) / interval_s).astype(np.int64)
    counts = np.bincount(bins).astype(np.float64)
    # The last bin is usually partial: drop it.
    return counts[:-1] / max(rate, 1e-9) if len(counts) > 1 else counts / max(rate, 1e-9)


def fit_forecast(counts: np.ndarray, interval_s: float,
                 validation_fraction: float = 0.2) -> Coefficients:
    r = np.asarray(counts, dtype=np.float64)
    if len(r) < 8:
        raise ForecastTrainError(f"need at least 8 intervals, got {len(r)}")
    y, r1, r2 = r[2:], r[1:-1], r[:-2]
    design = np.column_stack([np.ones_like(r1), r1, r2])
    n = len(y)
    split = max(3, min(n - 1, round(n * (1 - validation_fraction))))
    coef, *_ = np.linalg.lstsq(design[:split], y[:split], rcond=None)
    a, b, c = (float(v) for v in coef)
    val_pred = design[split:] @ coef
    metrics = {
        "intervals": len(r),
        "train_intervals": split,
        "validation_mae_requests": float(np.mean(np.abs(val_pred - y[split:]))),
        "persistence_mae_requests": float(np.mean(np.abs(r1[split:] - y[split:]))),
    }
    if not all(math.isfinite(v) for v in (a, b, c)):
        raise ForecastTrainError("the fit produced non-finite coefficients")
    return Coefficients(a, b, c, interval_s, metrics)
