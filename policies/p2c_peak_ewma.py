"""Peak-EWMA with power of two choices (tower's PeakEwma, Finagle, Linkerd).

cost = decayed peak-EWMA round-trip time x (inflight + 1): the expected wait
of a request placed now. The estimate lives in the backend state and decays
toward zero when read, so an idle backend is tried again. The cost is then
divided by the weight, multiplied by the failure penalty and divided by the
slow-start weight (see policies/p2c.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from policies.base import BackendView, PolicyContext, RequestInfo
from policies.p2c import CostAdjuster, CostOptions, pick_p2c


def peak_ewma_cost(ewma_s: float, inflight: int) -> float:
    return ewma_s * (inflight + 1)


class P2CPeakEwma:
    name: ClassVar[str] = "p2c_peak_ewma"

    class Options(CostOptions):
        pass

    def __init__(self, options: Options, ctx: PolicyContext) -> None:
        self.options = options
        self._clock = ctx.clock
        self._rng = ctx.rng
        self._adjust = CostAdjuster(options, ctx.clock())
        self._now = 0.0
        self._cost_fn = self._cost

    def _cost(self, b: BackendView) -> float:
        return (peak_ewma_cost(b.ewma_s(), b.inflight) / b.weight
                * self._adjust.factor(b, self._now))

    def pick(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        self._now = self._clock()
        return pick_p2c(ready, self._cost_fn, self._rng)

    def __repr__(self) -> str:
        return f"P2CPeakEwma({self.options!r})"
