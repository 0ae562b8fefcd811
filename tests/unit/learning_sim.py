"""A small deterministic simulation of a cluster, for the learning tests.

Requests arrive every `dt_s` of a fake clock; each is routed by a real
policy, tracked through the real `Cluster.track`, recorded by the real
`TelemetryRecorder`, and completes after a latency drawn from a known
function of (backend, route class, inflight). Backend "b0" also fails fast
with a 500 sometimes, so a fast-failing backend exists to be avoided.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from policies.base import Policy, RequestInfo
from proxy.state import Backend, Cluster, Outcome

ROUTES = ("fast", "slow")


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def route_factor(backend_index: int, route: str) -> float:
    # Request-aware: even backends are quick on "fast", odd ones on "slow".
    good = (backend_index % 2 == 0) == (route == "fast")
    return 1.0 if good else 3.0


@dataclass
class Sim:
    n_backends: int = 4
    base_ms: float = 5.0
    seed: int = 0
    fail_rate_b0: float = 0.2
    clock: FakeClock = field(default_factory=FakeClock)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.cluster = Cluster("c", [Backend(f"b{i}", f"http://127.0.0.1:{9000 + i}")
                                     for i in range(self.n_backends)], clock=self.clock)
        self.index = {f"b{i}": i for i in range(self.n_backends)}

    def latency_s(self, i: int, route: str, inflight: int) -> float:
        ms = self.base_ms * route_factor(i, route) * (1.0 + 0.25 * inflight)
        return ms * self.rng.uniform(0.8, 1.2) / 1e3

    def run(self, policy: Policy, n_requests: int, *, dt_s: float = 0.002,
            recorder: Any = None, request: Sequence[str] = ROUTES) -> list[float]:
        """Route n requests; return their latencies (failures count as 1 s)."""
        pending: list[tuple[float, int, Any, Any, Any, RequestInfo, Any, Outcome]] = []
        latencies: list[float] = []
        for seq in range(n_requests):
            self.clock.t += dt_s
            while pending and pending[0][0] <= self.clock.t:
                _, _, cm, tracker, state, info, token, out = heapq.heappop(pending)
                self._finish(policy, cm, tracker, state, info, token, out, recorder, latencies)
            info = RequestInfo(method="GET", route_class=self.rng.choice(list(request)))
            ready = self.cluster.ready()
            chosen = policy.pick(ready, info)
            assert chosen is not None
            state = self.cluster.get(chosen.id)
            prop = getattr(policy, "last_propensity", None)
            token = recorder.on_pick("c", ready, info, state, prop) if recorder else None
            cm = self.cluster.track(state)
            tracker = cm.__enter__()
            i = self.index[state.id]
            if i == 0 and self.rng.random() < self.fail_rate_b0:
                lat, status = 0.0005, 500
            else:
                lat, status = self.latency_s(i, info.route_class, state.inflight - 1), 200
            outcome = Outcome(status, lat, None, 0, info.route_class)
            heapq.heappush(pending, (self.clock.t + lat, seq, cm, tracker, state, info, token,
                                     outcome))
        while pending:
            t, _, cm, tracker, state, info, token, out = heapq.heappop(pending)
            self.clock.t = max(self.clock.t, t)
            self._finish(policy, cm, tracker, state, info, token, out, recorder, latencies)
        return latencies

    def _finish(self, policy: Policy, cm: Any, tracker: Any, state: Any, info: RequestInfo,
                token: Any, outcome: Outcome, recorder: Any, latencies: list[float]) -> None:
        tracker.finish(outcome)
        cm.__exit__(None, None, None)
        observe = getattr(policy, "observe", None)
        if observe is not None:
            observe(state, info, outcome)
        if recorder is not None:
            recorder.on_outcome(token, outcome)
        latencies.append(1.0 if outcome.failed else outcome.latency_s)
