"""Peak-EWMA with power of two choices (tower's PeakEwma, Finagle, Linkerd).

cost = round-trip estimate x (inflight + 1): the expected wait of a request
placed now. The estimate is the decayed peak EWMA of response times, or the
age of the backend's oldest attempt still waiting for its response when that
is longer: a request outstanding for t seconds will take at least t, and a
backend that stops answering sends no response that could raise the EWMA
(its requests end in client cancellations, not outcomes), so without the age
it keeps its old estimate, even decays it, and keeps getting traffic. The
EWMA lives in the backend state and decays toward zero when read, so an idle
backend is tried again. The cost is then divided by the weight, multiplied
by the failure penalty and divided by the slow-start weight (see
policies/p2c.py).
"""

from __future__ import annotations

from typing import ClassVar

from policies.base import BackendView
from policies.p2c import CostOptions, P2CPolicy


def peak_ewma_cost(ewma_s: float, inflight: int, waiting_s: float = 0.0) -> float:
    """Expected wait: max(EWMA, age of the oldest waiting attempt) x (inflight + 1)."""
    return (waiting_s if waiting_s > ewma_s else ewma_s) * (inflight + 1)


class P2CPeakEwma(P2CPolicy):
    name: ClassVar[str] = "p2c_peak_ewma"

    class Options(CostOptions):
        pass

    def _cost(self, b: BackendView) -> float:
        # peak_ewma_cost inlined: this runs twice per request.
        now = self._now
        rtt_s = b.ewma_s()
        since = b.waiting_since
        if since is not None and now - since > rtt_s:
            rtt_s = now - since
        return rtt_s * (b.inflight + 1) / b.weight * self._adjust.factor(b, now)
