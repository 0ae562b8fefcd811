"""The shared power-of-two-choices core, plus the cost adjustments every policy shares.

One P2C, several costs (tower's `p2c::Balance` over any `Load`): least-request,
peak-EWMA and the learned policy differ only in the `cost` they pass to
`pick_p2c`.

Two adjustments enter every cost:

- failure penalty (`failure_factor`): a backend that answers 5xx or drops
  connections quickly would otherwise look like the fastest backend and
  attract more traffic the more it fails (Linkerd's lesson). The cost is
  multiplied by `1 + penalty * e**2`, where `e` is the failed share of the
  backend's recent outcome window, faded by `exp(-(now - last_error_at) /
  decay_s)`. Squared so background noise barely moves traffic (1% errors:
  x1.01 at the default penalty 100) while a backend failing most requests is
  priced out (50%: x26, 100%: x101, the cap `1 + penalty`): it takes a
  healthy backend 10x slower with 10 requests in flight to lose to a backend
  that fails everything in no time. The fade returns the factor to 1 for a
  backend that stopped failing or stopped getting traffic, so a penalised
  backend is retried now and then instead of being starved forever by a
  window that only moves when it gets requests.
- slow start (`slow_start_factor`): a backend (re)admitted at `admitted_at`
  gets the effective weight `max(min_weight_percent / 100,
  (t / window_s) ** (1 / aggression))` for `t < window_s` (Envoy). RR and
  random multiply weights by it, so shares ramp exactly. Costs are divided by
  it, so in P2C a warming backend wins a comparison only against a rival 1/f
  times costlier: its share grows with the ramp and with the load on the
  others (an idle fleet does not need it; a busy one hands it work early).
  Backends already present when the policy was created are never ramped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

from pydantic import Field

from policies.base import BackendView, PolicyContext, PolicyOptions, RequestInfo

B = TypeVar("B", bound=BackendView)

DEFAULT_FAILURE_PENALTY = 100.0
DEFAULT_FAILURE_DECAY_S = 10.0


def pick_p2c(ready: Sequence[B], cost: Callable[[B], float], rng: random.Random) -> B | None:
    """Sample two distinct backends uniformly and return the cheaper one.

    Ties go to the first sample. The pair is an ordered uniform draw, so
    (a, b) and (b, a) are equally likely and the tie-break is a fair coin
    from `rng` without spending a third random number.
    """
    n = len(ready)
    if n == 0:
        return None
    if n == 1:
        return ready[0]
    # rng.random() is a C call; randrange costs ~10x more in Python.
    i = int(rng.random() * n)
    j = int(rng.random() * (n - 1))
    if j >= i:
        j += 1
    a = ready[i]
    b = ready[j]
    return b if cost(b) < cost(a) else a


def failure_factor(backend: BackendView, now: float, penalty: float, decay_s: float) -> float:
    """Cost multiplier in [1, 1 + penalty] for a backend's recent failures."""
    if penalty <= 0.0:
        return 1.0
    error_rate = backend.error_rate()
    if error_rate <= 0.0:
        return 1.0
    last = backend.last_error_at
    if last is not None and now > last:
        error_rate *= math.exp(-(now - last) / decay_s)
    return 1.0 + penalty * error_rate * error_rate


def slow_start_factor(admitted_at: float, now: float, since: float, window_s: float,
                      aggression: float, min_weight_percent: float) -> float:
    """Effective-weight multiplier in (0, 1] for a backend admitted at `admitted_at`.

    `since` is when the policy was created: a backend admitted at or before it
    was already serving and is not ramped.
    """
    if window_s <= 0.0 or admitted_at <= since:
        return 1.0
    elapsed = now - admitted_at
    if elapsed >= window_s:
        return 1.0
    floor = min_weight_percent / 100.0
    if elapsed <= 0.0:
        return floor
    return max(floor, (elapsed / window_s) ** (1.0 / aggression))


class CostOptions(PolicyOptions):
    """Options shared by every policy that applies the failure penalty and slow start."""

    # Cost multiplier at a 100% recent error rate is 1 + failure_penalty; 0 disables.
    failure_penalty: float = Field(default=DEFAULT_FAILURE_PENALTY, ge=0.0, le=1000.0)
    # Time constant with which the penalty fades once a backend stops failing.
    failure_decay_s: float = Field(default=DEFAULT_FAILURE_DECAY_S, gt=0.0)
    # Ramp length for a re-admitted or newly added backend; 0 disables slow start.
    slow_start_s: float = Field(default=0.0, ge=0.0)
    slow_start_aggression: float = Field(default=1.0, gt=0.0)
    slow_start_min_weight_percent: float = Field(default=10.0, gt=0.0, le=100.0)


class CostAdjuster:
    """The failure penalty and slow start of one policy, bound to its options and clock."""

    __slots__ = ("_aggression", "_created_at", "_decay_s", "_min_pct", "_penalty", "_window_s")

    def __init__(self, options: CostOptions, created_at: float) -> None:
        self._penalty = options.failure_penalty
        self._decay_s = options.failure_decay_s
        self._window_s = options.slow_start_s
        self._aggression = options.slow_start_aggression
        self._min_pct = options.slow_start_min_weight_percent
        self._created_at = created_at

    def factor(self, backend: BackendView, now: float) -> float:
        """Multiplier for a cost: failure penalty divided by slow-start weight (>= 1 when idle)."""
        f = failure_factor(backend, now, self._penalty, self._decay_s)
        if self._window_s > 0.0 and backend.admitted_at > self._created_at:
            f /= slow_start_factor(backend.admitted_at, now, self._created_at, self._window_s,
                                   self._aggression, self._min_pct)
        return f

    def weight_scale(self, backend: BackendView, now: float) -> float:
        """Multiplier for a weight: the inverse of `factor`."""
        return 1.0 / self.factor(backend, now)


class P2CPolicy:
    """Power of two choices on a cost: subclasses name themselves and define `_cost`.

    Least request and peak-EWMA differ only in the cost (tower's p2c::Balance
    over any `Load`); this holds the rest: options, clock, RNG, the cost
    adjuster (failure penalty, slow start) and `pick`.
    """

    name: ClassVar[str]
    Options: ClassVar[type[CostOptions]] = CostOptions

    def __init__(self, options: CostOptions, ctx: PolicyContext) -> None:
        self.options = options
        self._clock = ctx.clock
        self._rng = ctx.rng
        self._adjust = CostAdjuster(options, ctx.clock())
        self._now = 0.0  # the clock read once per pick, for every cost of that pick
        # Bound once so pick() allocates no closure per request.
        self._cost_fn = self._cost

    def _cost(self, b: BackendView) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define _cost")

    def pick(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        self._now = self._clock()
        return pick_p2c(ready, self._cost_fn, self._rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
