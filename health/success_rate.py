"""Success-rate detector: a backend failing much more often than the fleet.

Counts live in time buckets (a ring per backend), so `observe` is two
increments and a rare bucket roll; `evaluate` sums the window, takes the
fleet's median failure rate over backends with enough volume, and flags a
backend whose failure rate exceeds it by `margin`. A failure shared by the
whole fleet (an upstream dependency down) moves the median too, so it ejects
nobody.
"""

from __future__ import annotations

import math
import statistics

from health.base import Verdict
from health.config import SuccessRate as SuccessRateConfig
from proxy.state import Clock, Outcome


class _Ring:
    __slots__ = ("epoch", "failed", "total")

    def __init__(self, n: int, epoch: int) -> None:
        self.total = [0] * n
        self.failed = [0] * n
        self.epoch = epoch  # index (time / bucket_s) of the newest bucket

    def roll(self, epoch: int) -> None:
        """Advance to `epoch`, zeroing the buckets skipped (at most the ring's length)."""
        n = len(self.total)
        for e in range(max(self.epoch + 1, epoch - n + 1), epoch + 1):
            self.total[e % n] = 0
            self.failed[e % n] = 0
        self.epoch = epoch

    def sums(self) -> tuple[int, int]:
        return sum(self.total), sum(self.failed)


class SuccessRate:
    name = "success_rate"

    def __init__(self, config: SuccessRateConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self._n = max(1, math.ceil(config.window_s / config.bucket_s))
        self._rings: dict[str, _Ring] = {}

    def _epoch(self, t: float) -> int:
        return math.floor(t / self.config.bucket_s)

    def observe(self, backend_id: str, outcome: Outcome) -> None:
        epoch = self._epoch(self._clock())
        ring = self._rings.get(backend_id)
        if ring is None:
            ring = self._rings[backend_id] = _Ring(self._n, epoch)
        elif epoch != ring.epoch:
            ring.roll(epoch)
        i = epoch % self._n
        ring.total[i] += 1
        if outcome.failed:
            ring.failed[i] += 1

    def rates(self, now: float) -> dict[str, tuple[int, float]]:
        """Per backend: (requests, failure rate) over the window ending now."""
        epoch = self._epoch(now)
        out = {}
        for backend_id, ring in self._rings.items():
            if epoch != ring.epoch:
                ring.roll(epoch)
            total, failed = ring.sums()
            out[backend_id] = (total, failed / total if total else 0.0)
        return out

    def evaluate(self, now: float) -> list[Verdict]:
        cfg = self.config
        rates = self.rates(now)
        judged = [rate for total, rate in rates.values() if total >= cfg.min_requests]
        fleet = statistics.median(judged) if len(judged) >= cfg.min_hosts else 0.0
        limit = max(fleet + cfg.margin, cfg.min_failure_rate)
        verdicts = []
        for backend_id, (total, rate) in rates.items():
            if total < cfg.min_requests:
                verdicts.append(Verdict(backend_id, self.name, False,
                                        f"{total} requests in {cfg.window_s:g} s "
                                        f"(< {cfg.min_requests}, not judged)", 0.0))
                continue
            detected = rate >= limit
            reason = (f"failure rate {rate:.0%} over {total} requests in {cfg.window_s:g} s "
                      f"{'>=' if detected else '<'} {limit:.0%} (fleet median {fleet:.0%})")
            verdicts.append(Verdict(backend_id, self.name, detected, reason, rate - fleet))
        return verdicts

    def forget(self, backend_id: str) -> None:
        self._rings.pop(backend_id, None)
