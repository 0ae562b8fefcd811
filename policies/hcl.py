"""Hot-cold lexicographic selection (Prequal, Wydrowski et al., NSDI '24).

Per request, sample `d` distinct backends. A candidate is hot when its load
(requests in flight, or the utilisation the backend reports) is above the
`q_rif` quantile of recently seen loads across the fleet, else cold. Pick the
cold candidate with the lowest expected latency (at its current load, see
below); when every candidate is hot, pick the one with the lowest load.
Prequal's point: latency decides among backends with headroom, load decides
only when nobody has any, so traffic follows speed without piling onto the
fastest backend.

Differences from the paper: the candidates' state is read synchronously from
the proxy's own view instead of from asynchronous probes, and the "recent
distribution" is a ring buffer of the loads of the last candidates sampled
(Prequal's probe pool), whose quantile is refreshed every `_REFRESH_PICKS`
picks (a sort of `history` values, ~1 us for 64) rather than on every pick.

The latency must be the latency a request placed *now* would see. A
Prequal replica answers a probe with the median latency of its recent
queries at its current RIF, so a replica that takes on work reports a
higher latency at once. The proxy's analogue is the peak-EWMA cost of
policies/p2c_peak_ewma.py: round-trip estimate x (inflight + 1), where the
round-trip estimate is the decayed peak EWMA or the age of the oldest request
still waiting, whichever is longer. A load-blind latency (the EWMA alone)
herds: the hot threshold is a quantile of recent loads, so once a few
backends carry a queue the threshold rises to their level, every candidate
is cold, and the one with the lowest EWMA, which only moves when its
queued responses come back, takes every request it is sampled for. In a
homogeneous fleet at 70% load that held queues of ~18 and a p99 3x least
request's (tests/unit/test_policy_hcl.py). The latency is divided by
weight and multiplied by the failure penalty and slow-start factor (see
policies/p2c.py), so a backend that fails fast does not look fast; the same
factor inflates the load compared with the hot threshold, as least_request
prices it, `(load + 1) x factor - 1`, because a backend that fails in no time
has no load and would otherwise stay cold, and cold beats any latency (a
sinkhole). The history keeps the raw loads: it describes the fleet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import Field

from policies.base import BackendView, PolicyContext, RequestInfo
from policies.p2c import CostAdjuster, CostOptions

_REFRESH_PICKS = 16


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank q-quantile (q in [0, 1]); +inf for no values (nobody is hot)."""
    if not values:
        return math.inf
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


class HotColdLexicographic:
    name: ClassVar[str] = "hcl"

    class Options(CostOptions):
        # Candidates sampled per request (Prequal's d).
        d: int = Field(default=3, ge=2, le=64)
        # Loads above this quantile of recent loads are hot.
        q_rif: float = Field(default=0.84, ge=0.0, le=1.0)
        # inflight: the proxy's own requests in flight; reported_load: the
        # backend's endpoint-load-metrics utilisation (0 until it reports).
        load_signal: Literal["inflight", "reported_load"] = "inflight"
        # Loads kept for the quantile (Prequal's probe pool holds 16 probes;
        # a longer memory steadies the quantile, sorting it every 16 picks costs ~1 us).
        history: int = Field(default=64, ge=8, le=4096)

    def __init__(self, options: Options, ctx: PolicyContext) -> None:
        self.options = options
        self._clock = ctx.clock
        self._rng = ctx.rng
        self._adjust = CostAdjuster(options, ctx.clock())
        self._reported = options.load_signal == "reported_load"
        self._d = options.d
        self._history: list[float] = []
        self._size = options.history
        self._next = 0  # ring-buffer write position once full
        self._picks = 0
        self.hot_threshold = math.inf
        self._idx: list[int] = []

    def load(self, b: BackendView) -> float:
        if self._reported:
            reported = b.reported_load
            return reported if reported is not None else 0.0
        return float(b.inflight)

    def pick(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        n = len(ready)
        if n == 0:
            return None
        if n == 1:
            return ready[0]
        idx = self._idx
        if len(idx) != n:
            idx[:] = range(n)
        rng = self._rng
        d = self._d if self._d < n else n
        now = self._clock()
        threshold = self.hot_threshold
        adjust = self._adjust
        history = self._history
        size = self._size
        reported = self._reported
        best_cold: BackendView | None = None
        best_cold_latency = math.inf
        best_hot: BackendView | None = None
        best_hot_load = math.inf
        # Partial Fisher-Yates: the first d slots become a uniform sample without replacement.
        for k in range(d):
            j = k + int(rng.random() * (n - k))
            idx[k], idx[j] = idx[j], idx[k]
            b = ready[idx[k]]
            inflight = b.inflight
            if reported:
                r = b.reported_load
                load = r if r is not None else 0.0
            else:
                load = inflight
            if len(history) < size:
                history.append(load)
            else:
                history[self._next] = load
                self._next = (self._next + 1) % size
            factor = adjust.factor(b, now)
            if factor != 1.0:
                # Priced like least_request's (load + 1) x factor: a backend that
                # fails fast has no load and would otherwise stay cold (a sinkhole).
                load = (load + 1.0) * factor - 1.0
            if load > threshold:
                if load < best_hot_load:
                    best_hot, best_hot_load = b, load
            else:
                # Expected latency at the current load (see the module docstring).
                rtt_s = b.ewma_s()
                since = b.waiting_since
                if since is not None and now - since > rtt_s:
                    rtt_s = now - since
                latency = rtt_s * (inflight + 1) / b.weight * factor
                if latency < best_cold_latency:
                    best_cold, best_cold_latency = b, latency
        self._picks += 1
        if self._picks % _REFRESH_PICKS == 0:
            self.hot_threshold = quantile(history, self.options.q_rif)
        if best_cold is not None:
            return best_cold
        return best_hot

    def __repr__(self) -> str:
        return f"HotColdLexicographic({self.options!r}, hot_threshold={self.hot_threshold})"
