"""Helpers for the policy tests: a fake clock and a small open-loop simulation.

The simulation drives real `proxy.state.Cluster` objects: every pick is
tracked with `cluster.track()` until its (simulated) completion, then
finished with an `Outcome`, so inflight, peak EWMA and the error window move
exactly as they do in the proxy.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from policies.base import Policy, RequestInfo
from proxy.state import Backend, Cluster, Outcome, Tracker


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt_s: float) -> None:
        self.t += dt_s


def make_cluster(clock: FakeClock, weights: Mapping[str, int] | None = None, n: int = 0) -> Cluster:
    """A cluster of backends `b0..b{n-1}` (weight 1) or the given id -> weight."""
    spec = dict(weights) if weights is not None else {f"b{i}": 1 for i in range(n)}
    backends = [Backend(bid, f"http://127.0.0.1:{8000 + i}", weight=w)
                for i, (bid, w) in enumerate(spec.items())]
    return Cluster("test", backends, clock=clock)


def record(cluster: Cluster, backend_id: str, outcome: Outcome) -> None:
    """One completed attempt on a backend, recorded the way the proxy records it."""
    with cluster.track(cluster.get(backend_id)) as tracker:
        tracker.finish(outcome)


@dataclass(frozen=True)
class Behaviour:
    """How a simulated backend answers: mean service time, and whether it fails."""

    service_s: float = 0.010
    status: int = 200


def simulate(cluster: Cluster, policy: Policy, clock: FakeClock,
             behaviour: Callable[[str, float], Behaviour], *, rate_per_s: float,
             duration_s: float, seed: int = 1,
             window: tuple[float, float] | None = None) -> Counter[str]:
    """Poisson arrivals for `duration_s`; returns picks per backend id.

    Backends serve in parallel (no queue): each request takes an exponential
    time with the backend's mean at the moment of the pick. Only picks whose
    arrival time falls inside `window` (start, end) are counted, if given.
    """
    rng = random.Random(seed)
    picks: Counter[str] = Counter()
    pending: list[tuple[float, int, AbstractContextManager[Tracker], Tracker, Outcome | None]] = []
    seq = 0
    start = clock.t
    t = start
    end = start + duration_s
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= end:
            break
        _complete(pending, t, clock)
        clock.t = t
        chosen = policy.pick(cluster.ready(), RequestInfo())
        assert chosen is not None
        if window is None or window[0] <= t - start < window[1]:
            picks[chosen.id] += 1
        how = behaviour(chosen.id, t - start)
        latency_s = rng.expovariate(1.0 / how.service_s)
        cm = cluster.track(cluster.get(chosen.id))
        tracker = cm.__enter__()
        seq += 1
        heapq.heappush(pending, (t + latency_s, seq, cm, tracker, Outcome(how.status, latency_s)))
    _complete(pending, float("inf"), clock)
    clock.t = max(clock.t, end)
    return picks


def _complete(pending: list[tuple[float, int, AbstractContextManager[Tracker], Tracker,
                                   Outcome | None]],
              until: float, clock: FakeClock) -> None:
    while pending and pending[0][0] <= until:
        done_at, _, cm, tracker, outcome = heapq.heappop(pending)
        clock.t = done_at
        if outcome is not None:  # None: the client gave up; the slot is released unrecorded
            tracker.finish(outcome)
        cm.__exit__(None, None, None)


def shares(picks: Counter[str]) -> dict[str, float]:
    total = sum(picks.values())
    return {k: v / total for k, v in sorted(picks.items())}


@dataclass(frozen=True)
class QueueResult:
    """What a queueing run produced: latencies (s) by arrival, picks, and the worst backlog."""

    latencies_s: list[float] = field(repr=False)
    picks: Counter[str] = field(repr=False)
    max_inflight: int
    cancelled: int

    def percentile_s(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]


def simulate_queue(cluster: Cluster, policy: Policy, clock: FakeClock, *, rate_per_s: float,
                   duration_s: float, slots: int = 2, mean_s: float = 0.040, sigma: float = 0.5,
                   slowdown: Mapping[str, float] | None = None,
                   stall: tuple[str, float, float] | None = None, deadline_s: float = 2.0,
                   seed: int = 1, window: tuple[float, float] | None = None) -> QueueResult:
    """Poisson arrivals onto backends that queue like the bench fleet (bench/fleet.py).

    Each backend has `slots` workers and a FIFO queue; service times are
    lognormal with mean `mean_s` and shape `sigma`, times `slowdown[id]` (1
    when absent). `stall=(id, start, end)`
    holds every request reaching that backend during [start, end) until
    `end` (the fleet's stall event). A request still unanswered `deadline_s`
    after its arrival is cancelled by its client, as the load generator
    does: the proxy's tracker then leaves without an outcome, and the
    backend still serves it (the slot stays busy). Latencies are capped at
    the deadline; only arrivals inside `window` (start, end) are counted.
    """
    import math

    rng = random.Random(seed)
    mu = math.log(mean_s) - sigma * sigma / 2.0
    free_at: dict[str, list[float]] = {bid: [0.0] * slots for bid in cluster.states}
    latencies: list[float] = []
    picks: Counter[str] = Counter()
    pending: list[tuple[float, int, AbstractContextManager[Tracker], Tracker, Outcome | None]] = []
    seq = 0
    start = clock.t
    end = start + duration_s
    t = start
    max_inflight = 0
    cancelled = 0
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= end:
            break
        _complete(pending, t, clock)
        clock.t = t
        chosen = policy.pick(cluster.ready(), RequestInfo())
        assert chosen is not None
        bid = chosen.id
        arrive = t
        if stall is not None and stall[0] == bid and stall[1] <= t - start < stall[2]:
            arrive = start + stall[2]
        slots_free = free_at[bid]
        begin = max(arrive, heapq.heappop(slots_free))
        service_s = rng.lognormvariate(mu, sigma)
        if slowdown is not None:
            service_s *= slowdown.get(bid, 1.0)
        done = begin + service_s
        heapq.heappush(slots_free, done)
        latency_s = done - t
        cm = cluster.track(cluster.get(bid))
        tracker = cm.__enter__()
        max_inflight = max(max_inflight, chosen.inflight)
        seq += 1
        if latency_s > deadline_s:
            cancelled += 1
            heapq.heappush(pending, (t + deadline_s, seq, cm, tracker, None))
        else:
            heapq.heappush(pending, (done, seq, cm, tracker, Outcome(200, latency_s)))
        if window is None or window[0] <= t - start < window[1]:
            picks[bid] += 1
            latencies.append(min(latency_s, deadline_s))
    _complete(pending, float("inf"), clock)
    clock.t = max(clock.t, end)
    return QueueResult(latencies, picks, max_inflight, cancelled)
