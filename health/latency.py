"""Latency-outlier detector: a backend much slower than the fleet, even if it answers 200.

This is the case Envoy cannot eject (envoyproxy/envoy#288). Guarded against
HAProxy's warning (latency-based disabling taking out a whole pool): the
comparison is relative to the fleet's median, needs a minimum volume and
several judged backends, and the checker's max_ejection_percent caps it.

`observe` appends (time, latency) to a bounded deque; `evaluate` sorts.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from health.base import Verdict
from health.config import LatencyOutlier as LatencyConfig
from proxy.state import Clock, Outcome


def nearest_rank(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile (0..100) of an ascending, non-empty list."""
    rank = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[rank]


class LatencyOutlier:
    name = "latency"

    def __init__(self, config: LatencyConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self._samples: dict[str, deque[tuple[float, float]]] = {}

    def observe(self, backend_id: str, outcome: Outcome) -> None:
        # Transport errors have no service time; the failure detectors own them.
        if outcome.error_kind is not None:
            return
        samples = self._samples.get(backend_id)
        if samples is None:
            samples = self._samples[backend_id] = deque(maxlen=self.config.max_samples)
        samples.append((self._clock(), outcome.latency_s))

    def quantiles(self, now: float) -> dict[str, tuple[int, float]]:
        """Per backend: (samples in window, latency quantile in seconds; NaN if none)."""
        horizon = now - self.config.window_s
        out = {}
        for backend_id, samples in self._samples.items():
            recent = sorted(lat for t, lat in samples if t >= horizon)
            out[backend_id] = (len(recent),
                               nearest_rank(recent, self.config.quantile) if recent else math.nan)
        return out

    def evaluate(self, now: float) -> list[Verdict]:
        cfg = self.config
        q = self.quantiles(now)
        judged = [v for n, v in q.values() if n >= cfg.min_requests]
        verdicts = []
        if len(judged) < cfg.min_hosts:
            for backend_id in q:
                verdicts.append(Verdict(backend_id, self.name, False,
                                        f"fleet too small to compare ({len(judged)} backends "
                                        f"with >= {cfg.min_requests} samples)", 0.0))
            return verdicts
        fleet_s = statistics.median(judged)
        limit_s = max(fleet_s * cfg.ratio, fleet_s + cfg.min_excess_s)
        label = f"p{cfg.quantile:g}"
        for backend_id, (n, value_s) in q.items():
            if n < cfg.min_requests:
                verdicts.append(Verdict(backend_id, self.name, False,
                                        f"{n} samples in {cfg.window_s:g} s "
                                        f"(< {cfg.min_requests}, not judged)", 0.0))
                continue
            detected = value_s >= limit_s
            ratio = value_s / fleet_s if fleet_s > 0 else math.inf
            reason = (f"{label} {value_s * 1e3:.1f} ms over {n} samples = {ratio:.1f}x fleet "
                      f"median {fleet_s * 1e3:.1f} ms ({'>=' if detected else '<'} limit "
                      f"{limit_s * 1e3:.1f} ms)")
            verdicts.append(Verdict(backend_id, self.name, detected, reason,
                                    ratio if math.isfinite(ratio) else 1e9))
        return verdicts

    def forget(self, backend_id: str) -> None:
        self._samples.pop(backend_id, None)
