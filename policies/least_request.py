"""Least request with power of two choices (Envoy's LEAST_REQUEST, tower's PendingRequests).

cost = (inflight + 1) / weight, times the failure penalty and divided by the
slow-start weight (see policies/p2c.py). The `+ 1` counts the request being
placed, so weights matter even when every backend is idle: between two idle
backends the heavier one wins.
"""

from __future__ import annotations

from typing import ClassVar

from policies.base import BackendView
from policies.p2c import CostOptions, P2CPolicy


def least_request_cost(inflight: int, weight: int) -> float:
    return (inflight + 1) / weight


class LeastRequest(P2CPolicy):
    name: ClassVar[str] = "least_request"

    class Options(CostOptions):
        pass

    def _cost(self, b: BackendView) -> float:
        return least_request_cost(b.inflight, b.weight) * self._adjust.factor(b, self._now)
