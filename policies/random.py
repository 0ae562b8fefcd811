"""Weighted random: each backend with probability weight / total weight.

Cumulative weights are built once per ready sequence (the cluster hands out
the same tuple until membership or health changes) and searched by bisection.
Slow start and, if enabled, the failure penalty scale the weights per pick
(both default off here: plain random is a baseline). The probability of the
pick is exposed as `last_propensity` for off-policy evaluation.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import ClassVar

from pydantic import Field

from policies.base import BackendView, PolicyContext, RequestInfo
from policies.p2c import CostAdjuster, CostOptions


class Random:
    name: ClassVar[str] = "random"

    class Options(CostOptions):
        failure_penalty: float = Field(default=0.0, ge=0.0, le=1000.0)

    def __init__(self, options: Options, ctx: PolicyContext) -> None:
        self.options = options
        self._clock = ctx.clock
        self._rng = ctx.rng
        self._created_at = ctx.clock()
        self._adjust = CostAdjuster(options, self._created_at)
        self._penalised = options.failure_penalty > 0.0
        self._ready: Sequence[BackendView] | None = None
        self._cumulative: list[float] = []
        self._uniform = True
        # Latest admission among the ready backends: slow start can only be
        # active while now < this + slow_start_s.
        self._latest_admission = 0.0
        self.last_propensity: float | None = None

    def _sync(self, ready: Sequence[BackendView]) -> None:
        self._cumulative = list(accumulate(float(b.weight) for b in ready))
        self._uniform = all(b.weight == ready[0].weight for b in ready)
        self._latest_admission = max(b.admitted_at for b in ready)
        self._ready = ready

    def pick(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        n = len(ready)
        if n == 0:
            self.last_propensity = None
            return None
        if ready is not self._ready:
            self._sync(ready)
        opts = self.options
        if self._penalised or (
                opts.slow_start_s > 0.0 and self._latest_admission > self._created_at
                and self._clock() < self._latest_admission + opts.slow_start_s):
            return self._pick_adjusted(ready)
        u = self._rng.random()
        if self._uniform:
            self.last_propensity = 1.0 / n
            return ready[min(n - 1, int(u * n))]
        cumulative = self._cumulative
        total = cumulative[-1]
        i = min(n - 1, bisect_right(cumulative, u * total))
        self.last_propensity = ready[i].weight / total
        return ready[i]

    def _pick_adjusted(self, ready: Sequence[BackendView]) -> BackendView:
        now = self._clock()
        adjust = self._adjust
        weights = [b.weight * adjust.weight_scale(b, now) for b in ready]
        total = sum(weights)
        x = self._rng.random() * total
        acc = 0.0
        for i, w in enumerate(weights):
            acc += w
            if x < acc:
                self.last_propensity = w / total
                return ready[i]
        self.last_propensity = weights[-1] / total
        return ready[-1]

    def __repr__(self) -> str:
        return f"Random({self.options!r})"
