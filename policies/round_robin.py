"""Smooth weighted round robin (nginx's `ngx_http_upstream_get_peer`).

Each pick adds every backend's weight to its running `current` value, picks
the largest, and subtracts the total from the winner. With weights 5:1:1 the
sequence is a a b a c a a: exact shares over every cycle, spread out rather
than in bursts.

The running values are keyed by backend id, so a ready-list change (a backend
ejected, added or re-admitted, or a retry that excludes the backend already
tried) keeps everyone's position in the cycle; a newcomer starts at 0. A pick
adds the total and subtracts it again, so it never changes the sum of the
values taking part and nobody gains a burst from a change. Slow start and, if
enabled, the failure penalty scale the weights (both default off here: plain
round robin is a baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from policies.base import BackendView, PolicyContext, RequestInfo
from policies.p2c import CostAdjuster, CostOptions


class RoundRobin:
    name: ClassVar[str] = "round_robin"

    class Options(CostOptions):
        failure_penalty: float = Field(default=0.0, ge=0.0, le=1000.0)

    def __init__(self, options: Options, ctx: PolicyContext) -> None:
        self.options = options
        self._clock = ctx.clock
        self._created_at = ctx.clock()
        self._adjust = CostAdjuster(options, self._created_at)
        self._dynamic = options.failure_penalty > 0.0 or options.slow_start_s > 0.0
        self._current: dict[str, float] = {}
        # Positional copy of `_current` for the last ready sequence seen; the
        # cluster hands out the same tuple until membership or health changes.
        self._ready: Sequence[BackendView] | None = None
        self._cw: list[float] = []

    def _sync(self, ready: Sequence[BackendView]) -> None:
        if self._ready is not None:
            for b, cw in zip(self._ready, self._cw, strict=True):
                self._current[b.id] = cw
        if len(self._current) > 4 * len(ready) + 64:
            # Membership churned a lot: forget ids that are gone.
            ids = {b.id for b in ready}
            self._current = {k: v for k, v in self._current.items() if k in ids}
        self._cw = [self._current.get(b.id, 0.0) for b in ready]
        self._ready = ready

    def pick(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        n = len(ready)
        if n == 0:
            return None
        if ready is not self._ready:
            self._sync(ready)
        cw = self._cw
        total = 0.0
        best = 0
        best_cw = -1e300
        if self._dynamic:
            now = self._clock()
            adjust = self._adjust
            for i in range(n):
                b = ready[i]
                w = b.weight * adjust.weight_scale(b, now)
                c = cw[i] + w
                cw[i] = c
                total += w
                if c > best_cw:
                    best, best_cw = i, c
        else:
            for i in range(n):
                w = ready[i].weight
                c = cw[i] + w
                cw[i] = c
                total += w
                if c > best_cw:
                    best, best_cw = i, c
        cw[best] -= total
        return ready[best]

    def __repr__(self) -> str:
        return f"RoundRobin({self.options!r})"
