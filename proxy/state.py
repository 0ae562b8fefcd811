"""Backend identity and per-backend state: the shared vocabulary of the data plane.

One writer per field (see DESIGN.md §2):
- request-side fields (inflight, EWMA, window, counters) are written only
  through `Cluster.track()`;
- health fields only through `Cluster.set_health()`;
- policies and detectors only read.

This module imports nothing else of ours.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import NamedTuple

Clock = Callable[[], float]

# Error kinds an outcome can carry; bounded so they can be metric labels.
ERROR_CONNECT = "connect"
ERROR_TIMEOUT = "timeout"
ERROR_RESET = "reset"
ERROR_KINDS = (ERROR_CONNECT, ERROR_TIMEOUT, ERROR_RESET)

DEFAULT_DECAY_S = 10.0
DEFAULT_RTT_S = 0.010  # the estimate a backend starts with, before any response
WINDOW_SIZE = 128
# Weight of a new observation in the per-route-class latency EWMA
# (BackendState.route_ewma_s): request-aware features need a backend's
# latency for *this kind* of request, not only its blended EWMA.
ROUTE_EWMA_ALPHA = 0.2


@dataclass(frozen=True, slots=True)
class Backend:
    """Identity of one upstream server. Never changes while the backend exists."""

    id: str
    url: str
    weight: int = 1
    metadata: Mapping[str, str] = field(default_factory=dict)


class Health(enum.Enum):
    HEALTHY = "healthy"
    # Detected by a detector but allowed to serve (shadow mode or guard).
    SUSPECT = "suspect"
    EJECTED = "ejected"


class Outcome(NamedTuple):
    """What one upstream attempt ended with (a NamedTuple: one per request, cheap)."""

    status: int  # HTTP status from the backend; 0 when there was no response
    latency_s: float
    error_kind: str | None = None  # one of ERROR_KINDS, or None
    bytes_out: int = 0
    route_class: str = ""

    @property
    def failed(self) -> bool:
        """A transport error or a 5xx: the backend did not do its job."""
        return self.error_kind is not None or self.status >= 500


class PeakEwma:
    """Peak-sensitive EWMA of round-trip time (tower / Finagle).

    Rises to a new peak at once, otherwise decays toward observations with a
    time constant `decay_s`. Reading decays the estimate toward zero for the
    time elapsed since the last update, so an idle backend is tried again.
    """

    __slots__ = ("_clock", "_observed", "_rtt_s", "_updated_at", "decay_s")

    def __init__(self, clock: Clock, decay_s: float = DEFAULT_DECAY_S,
                 initial_rtt_s: float = DEFAULT_RTT_S) -> None:
        self._clock = clock
        self.decay_s = decay_s
        self._rtt_s = initial_rtt_s
        self._observed = False
        self._updated_at = clock()

    def observe(self, rtt_s: float) -> None:
        now = self._clock()
        if not self._observed:
            # The first response replaces the prior outright: a prior that
            # decays away over decay_s would hide real speed differences.
            self._observed = True
            self._rtt_s = rtt_s
        elif rtt_s > self._rtt_s:
            self._rtt_s = rtt_s
        else:
            w = math.exp(-max(0.0, now - self._updated_at) / self.decay_s)
            self._rtt_s = self._rtt_s * w + rtt_s * (1.0 - w)
        self._updated_at = now

    def read(self) -> float:
        """Current estimate, decayed toward zero since the last observation."""
        elapsed = self._clock() - self._updated_at
        if elapsed <= 0:
            return self._rtt_s
        return self._rtt_s * math.exp(-elapsed / self.decay_s)


class OutcomeWindow:
    """The last `size` outcomes of one backend: latencies and failure flags."""

    __slots__ = ("_failed", "_latency_s", "_size", "_timeouts", "failures", "timeouts")

    def __init__(self, size: int = WINDOW_SIZE) -> None:
        self._size = size
        self._latency_s: deque[float] = deque(maxlen=size)
        self._failed: deque[bool] = deque(maxlen=size)
        self._timeouts: deque[bool] = deque(maxlen=size)
        self.failures = 0  # failures currently inside the window
        self.timeouts = 0

    def add(self, outcome: Outcome) -> bool:
        """Add one outcome; returns whether it failed."""
        failed = outcome.error_kind is not None or outcome.status >= 500
        timed_out = outcome.error_kind == ERROR_TIMEOUT
        if len(self._failed) == self._size:
            self.failures -= self._failed[0]
            self.timeouts -= self._timeouts[0]
        self._latency_s.append(outcome.latency_s)
        self._failed.append(failed)
        self._timeouts.append(timed_out)
        self.failures += failed
        self.timeouts += timed_out
        return failed

    def __len__(self) -> int:
        return len(self._failed)

    @property
    def error_rate(self) -> float:
        n = len(self._failed)
        return self.failures / n if n else 0.0

    @property
    def timeout_rate(self) -> float:
        n = len(self._timeouts)
        return self.timeouts / n if n else 0.0

    def latencies_s(self) -> Sequence[float]:
        return tuple(self._latency_s)

    def last_latencies_s(self, n: int) -> list[float]:
        """The last `n` latencies, oldest first (without copying the whole window)."""
        last = list(islice(reversed(self._latency_s), n))
        last.reverse()
        return last

    def percentile_s(self, q: float) -> float:
        """Nearest-rank percentile of recent latencies; NaN when empty."""
        if not self._latency_s:
            return math.nan
        ordered = sorted(self._latency_s)
        rank = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
        return ordered[rank]


class BackendState:
    """Everything the proxy knows about one backend now. Policies only read it."""

    __slots__ = (
        "_clock",
        "admitted_at",
        "backend",
        "consecutive_failures",
        "ejections",
        "errors",
        "ewma",
        "health",
        "health_reason",
        "id",
        "inflight",
        "last_error_at",
        "reported_load",
        "requests",
        "route_ewma_s",
        "waiting",
        "waiting_since",
        "weight",
        "window",
    )

    def __init__(self, backend: Backend, clock: Clock, decay_s: float = DEFAULT_DECAY_S) -> None:
        self.backend = backend
        # Copies of the backend's (frozen) identity: read on every request, and an
        # attribute costs less than a property.
        self.id = backend.id
        self.weight = backend.weight
        self._clock = clock
        self.inflight = 0
        self.ewma = PeakEwma(clock, decay_s)
        self.window = OutcomeWindow()
        self.requests = 0
        self.errors = 0
        # Route class -> EWMA of the latency of answers for that class, 5xx included
        # (transport errors carry no service time; bounded: route classes come from
        # the config).
        self.route_ewma_s: dict[str, float] = {}
        self.consecutive_failures = 0
        self.last_error_at: float | None = None
        # Utilisation 0..1 reported by the backend (endpoint-load-metrics), if any.
        self.reported_load: float | None = None
        self.health = Health.HEALTHY
        self.health_reason = ""
        self.ejections = 0
        # When the backend (re)joined the ready set; drives slow start.
        self.admitted_at = clock()
        # Attempts in start order, from the oldest still waiting for its
        # response; attempts that got theirs are dropped from the left (see Tracker).
        self.waiting: deque[Tracker] = deque()
        # Start (cluster clock) of the oldest attempt still waiting for its
        # response, None when none is. A backend that stopped answering sends
        # no outcome, so its EWMA cannot rise; this age is what shows it.
        self.waiting_since: float | None = None

    def ewma_s(self) -> float:
        return self.ewma.read()

    def error_rate(self) -> float:
        """Share of failed outcomes among the recent window (0 when none yet)."""
        return self.window.error_rate

    def latency_percentile_s(self, q: float) -> float:
        """Recent latency percentile (0..100); NaN before any response."""
        return self.window.percentile_s(q)

    def __repr__(self) -> str:
        return (
            f"BackendState({self.backend.id!r}, health={self.health.value}, "
            f"inflight={self.inflight}, ewma_ms={self.ewma_s() * 1e3:.2f})"
        )


class Tracker:
    """One in-flight attempt: a context manager that holds an inflight slot.

    `finish(outcome)` records the outcome once; leaving the block without it
    (cancellation) records nothing but still releases the slot. A plain class
    rather than @contextmanager: this runs on every request.

    From entering until `finish` or exit, whichever comes first, the attempt
    is *waiting* (for its response; a streamed body or a WebSocket after its
    upgrade is not waiting). Waiting attempts sit in `state.waiting` in start
    order; one that stops waiting is only flagged, and flagged ones are
    popped when they reach the left end, so each attempt costs O(1)
    amortised and the left end is always the oldest waiting attempt.
    """

    __slots__ = ("_cluster", "_done", "_waiting", "started_at", "state")

    def __init__(self, cluster: Cluster, state: BackendState) -> None:
        self._cluster = cluster
        self.state = state
        self._done = False
        self._waiting = False
        self.started_at = 0.0

    def __enter__(self) -> Tracker:
        state = self.state
        state.inflight += 1
        self.started_at = now = self._cluster.clock()
        self._waiting = True
        waiting = state.waiting
        if not waiting:
            state.waiting_since = now
        waiting.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        state = self.state
        state.inflight -= 1
        if self._waiting:
            self._waiting = False
            _drop_answered(state)

    def finish(self, outcome: Outcome) -> None:
        if self._done:
            return
        self._done = True
        state = self.state
        if self._waiting:
            self._waiting = False
            _drop_answered(state)
        self._cluster._record(state, outcome)


def _drop_answered(state: BackendState) -> None:
    """Pop attempts that stopped waiting off the left end; the new left end is the oldest."""
    waiting = state.waiting
    if waiting[0]._waiting:
        return
    waiting.popleft()
    while waiting:
        if waiting[0]._waiting:
            state.waiting_since = waiting[0].started_at
            return
        waiting.popleft()
    state.waiting_since = None


OutcomeListener = Callable[[BackendState, Outcome], None]


class Cluster:
    """A named pool of backends, their states and the ready list.

    The ready list is a tuple rebuilt whenever health or membership changes,
    never per request.
    """

    def __init__(self, name: str, backends: Sequence[Backend], clock: Clock = time.monotonic,
                 decay_s: float = DEFAULT_DECAY_S) -> None:
        self.name = name
        self.clock = clock
        self._decay_s = decay_s
        self.states: dict[str, BackendState] = {}
        self._outcome_listeners: list[OutcomeListener] = []
        self.panic = False
        # With nothing healthy: route to all (True, Envoy's panic) or answer 503 (False).
        self.panic_routing = True
        self._ready: tuple[BackendState, ...] = ()
        self.set_backends(backends)

    # -- membership -------------------------------------------------------
    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Replace membership, keeping the state of backends whose identity is unchanged."""
        fresh: dict[str, BackendState] = {}
        for b in backends:
            old = self.states.get(b.id)
            fresh[b.id] = old if old is not None and old.backend == b else BackendState(
                b, self.clock, self._decay_s)
        self.states = fresh
        self._rebuild_ready()

    def set_decay_s(self, decay_s: float) -> None:
        """A new EWMA time constant for every backend, keeping what each has measured."""
        self._decay_s = decay_s
        for state in self.states.values():
            state.ewma.decay_s = decay_s

    @property
    def backends(self) -> tuple[Backend, ...]:
        return tuple(s.backend for s in self.states.values())

    # -- reads --------------------------------------------------------------
    def ready(self) -> tuple[BackendState, ...]:
        return self._ready

    def get(self, backend_id: str) -> BackendState:
        return self.states[backend_id]

    # -- the request-side writer ----------------------------------------------
    def track(self, state: BackendState) -> Tracker:
        """`with cluster.track(state) as t:` counts an attempt in flight until the block exits."""
        return Tracker(self, state)

    def _record(self, state: BackendState, outcome: Outcome) -> None:
        state.requests += 1
        failed = state.window.add(outcome)
        if failed:
            state.errors += 1
            state.consecutive_failures += 1
            state.last_error_at = self.clock()
        else:
            state.consecutive_failures = 0
        if outcome.error_kind is None:
            # Transport failures carry no service time; they are penalised by
            # the failure rate instead so a failing backend never looks fast.
            latency_s = outcome.latency_s
            state.ewma.observe(latency_s)
            route_ewma = state.route_ewma_s
            old = route_ewma.get(outcome.route_class)
            route_ewma[outcome.route_class] = latency_s if old is None else (
                old + ROUTE_EWMA_ALPHA * (latency_s - old))
        for listener in self._outcome_listeners:
            listener(state, outcome)

    def on_outcome(self, listener: OutcomeListener) -> None:
        """Call `listener(state, outcome)` after every recorded outcome (hot path: O(1))."""
        self._outcome_listeners.append(listener)

    def remove_outcome_listener(self, listener: OutcomeListener) -> None:
        """Stop calling `listener`; a no-op when it was not subscribed."""
        if listener in self._outcome_listeners:
            self._outcome_listeners.remove(listener)

    def set_reported_load(self, backend_id: str, utilization: float | None) -> None:
        state = self.states.get(backend_id)
        if state is not None:
            state.reported_load = utilization

    # -- the health writer ------------------------------------------------------
    def set_health(self, backend_id: str, health: Health, reason: str) -> bool:
        """Set a backend's health; returns whether it changed."""
        state = self.states.get(backend_id)
        if state is None:
            return False
        changed = state.health is not health
        state.health_reason = reason
        if not changed:
            return False
        if health is Health.EJECTED:
            state.ejections += 1
        elif state.health is Health.EJECTED:
            state.admitted_at = self.clock()
        state.health = health
        self._rebuild_ready()
        return True

    def _rebuild_ready(self) -> None:
        ready = tuple(s for s in self.states.values() if s.health is not Health.EJECTED)
        # Panic: with nothing healthy left, route to everyone rather than fail
        # every request (Envoy's panic threshold at its limit).
        self.panic = not ready and bool(self.states) and self.panic_routing
        self._ready = ready if ready or not self.panic_routing else tuple(self.states.values())

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, backends={len(self.states)}, ready={len(self._ready)})"
