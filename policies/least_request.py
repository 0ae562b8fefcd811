"""Least request with power of two choices (Envoy's LEAST_REQUEST, tower's PendingRequests).

cost = (inflight + 1) / weight, times the failure penalty and divided by the
slow-start weight (see policies/p2c.py). The `+ 1` counts the request being
placed, so weights matter even when every backend is idle: between two idle
backends the heavier one wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from policies.base import BackendView, PolicyContext, RequestInfo
from policies.p2c import CostAdjuster, CostOptions, pick_p2c


def least_request_cost(inflight: int, weight: int) -> float:
    return (inflight + 1) / weight


class LeastRequest:
    name: ClassVar[str] = "least_request"

    class Options(CostOptions):
        pass

    def __init__(self, options: Options, ctx: PolicyContext) -> None:
        self.options = options
        self._clock = ctx.clock
        self._rng = ctx.rng
        self._adjust = CostAdjuster(options, ctx.clock())
        self._now = 0.0
        # Bound once so pick() allocates no closure per request.
        self._cost_fn = self._cost

    def _cost(self, b: BackendView) -> float:
        return least_request_cost(b.inflight, b.weight) * self._adjust.factor(b, self._now)

    def pick(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        self._now = self._clock()
        return pick_p2c(ready, self._cost_fn, self._rng)

    def __repr__(self) -> str:
        return f"LeastRequest({self.options!r})"
