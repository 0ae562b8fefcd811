"""The feature schema of the latency model: names, order, types, version.

This is the only place that defines what the model sees for one
(request, backend) pair at decision time. Telemetry writes these rows, the
trainer fits on them, the exported model carries `SCHEMA_VERSION` and
`FEATURE_NAMES` in its metadata, and `policies.onnx_latency` refuses a model
whose schema differs. Change a feature -> bump `SCHEMA_VERSION`.

All features are float32. Missing values are never NaN: each has a stated
stand-in plus, where it matters, an explicit `*_missing` indicator:

request side (same value in every row of one decision)
  req_write        1 for POST/PUT/PATCH/DELETE, else 0
  req_body_log     log1p(body bytes)
  route_slot_0..7  one-hot route class; slots follow the config's route
                   classes in order, the last slot is "other"
backend side (one row per ready backend)
  inflight                 attempts in flight now
  ewma_ms                  decayed peak EWMA of latency
  route_ewma_ms            this backend's latency EWMA for the request's route
                           class (state.route_ewma_s); missing -> ewma_ms
  ewma_cost_ms             ewma_ms * (inflight + 1)        (derived)
  route_cost_ms            route_ewma_ms * (inflight + 1)  (derived)
  route_missing            1 when the backend has no latency for this class yet
  p50_ms, p90_ms           recent window percentiles; missing -> ewma_ms
  recent_ms                mean of the last RECENT_N latencies (the queue the
                           backend has now, which the slower EWMAs smooth out)
  window_n_log             log1p(outcomes in the window); 0 = no history
  error_rate, timeout_rate share of failures / timeouts in the window
  since_error_s            seconds since the last failure, capped (never -> cap)
  consecutive_failures     capped
  load                     utilisation reported by the backend
                           (endpoint-load-metrics); missing -> 0
  load_missing             1 when the backend reports nothing

Derived features live here, not in the trainer, so training and serving
cannot compute them differently.

`FeatureMatrix` keeps one persistent float32 matrix per ready list: backend
columns are refreshed when a backend's outcome is observed and every
`refresh_s`; per request only the inflight column, the derived costs and
(when the request differs from the previous one) the request columns are
written. `build()` computes a matrix from scratch (telemetry, tests).

Imports only the vocabulary (policies.base).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from policies.base import BackendView, Clock, RequestInfo

SCHEMA_VERSION = 2
ROUTE_SLOTS = 8  # the last slot collects every other route class
OTHER_SLOT = ROUTE_SLOTS - 1
SINCE_ERROR_CAP_S = 300.0
RECENT_N = 4
INFLIGHT_CAP = 1024.0
FAILURES_CAP = 100.0
LATENCY_CAP_MS = 600_000.0
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

REQUEST_FEATURES: tuple[str, ...] = (
    "req_write",
    "req_body_log",
    *(f"route_slot_{i}" for i in range(ROUTE_SLOTS)),
)
BACKEND_FEATURES: tuple[str, ...] = (
    "inflight",
    "ewma_ms",
    "route_ewma_ms",
    "ewma_cost_ms",
    "route_cost_ms",
    "route_missing",
    "p50_ms",
    "p90_ms",
    "recent_ms",
    "window_n_log",
    "error_rate",
    "timeout_rate",
    "since_error_s",
    "consecutive_failures",
    "load",
    "load_missing",
)
FEATURE_NAMES: tuple[str, ...] = REQUEST_FEATURES + BACKEND_FEATURES
N_FEATURES = len(FEATURE_NAMES)
DTYPE = np.float32
_IX = {name: i for i, name in enumerate(FEATURE_NAMES)}

# Column indices used on the hot path.
REQ_WRITE = _IX["req_write"]
REQ_BODY = _IX["req_body_log"]
ROUTE0 = _IX["route_slot_0"]
INFLIGHT = _IX["inflight"]
EWMA = _IX["ewma_ms"]
ROUTE_EWMA = _IX["route_ewma_ms"]
EWMA_COST = _IX["ewma_cost_ms"]
ROUTE_COST = _IX["route_cost_ms"]
ROUTE_MISSING = _IX["route_missing"]
ERROR_RATE = _IX["error_rate"]
RECENT = _IX["recent_ms"]
CONSECUTIVE = _IX["consecutive_failures"]
SINCE_ERROR = _IX["since_error_s"]
N_REQUEST = len(REQUEST_FEATURES)
assert REQ_WRITE == 0 and REQ_BODY == 1 and ROUTE0 == 2  # the request block comes first
# Pairs of adjacent columns so one numpy call updates both costs.
assert ROUTE_EWMA == EWMA + 1 and ROUTE_COST == EWMA_COST + 1


class SchemaError(Exception):
    """Features or a model that do not match this schema."""


def schema_metadata(route_classes: Sequence[str]) -> dict[str, str]:
    """Key/values an exported model or telemetry header carries to identify the schema."""
    import json

    return {
        "foretell.schema_version": str(SCHEMA_VERSION),
        "foretell.feature_names": json.dumps(list(FEATURE_NAMES)),
        "foretell.route_classes": json.dumps(list(route_classes)),
    }


def check_schema(schema_version: Any, feature_names: Any) -> None:
    """Raise SchemaError unless version and names are exactly this schema's."""
    if str(schema_version) != str(SCHEMA_VERSION):
        raise SchemaError(f"schema version {schema_version!r}, expected {SCHEMA_VERSION}")
    if list(feature_names) != list(FEATURE_NAMES):
        raise SchemaError(
            f"feature names differ from schema {SCHEMA_VERSION}: "
            f"got {list(feature_names)[:4]}..., expected {list(FEATURE_NAMES)[:4]}...")


class RouteSlots:
    """Route class name -> one-hot slot (bounded; unknown classes -> the last slot)."""

    __slots__ = ("_slot", "classes")

    def __init__(self, route_classes: Iterable[str]) -> None:
        self.classes: tuple[str, ...] = tuple(dict.fromkeys(route_classes))
        self._slot = {name: i for i, name in enumerate(self.classes[:OTHER_SLOT])}

    def slot(self, route_class: str) -> int:
        return self._slot.get(route_class, OTHER_SLOT)


def _window_stats(view: BackendView) -> tuple[float, float, float, int, float]:
    """(p50_s, p90_s, recent_s, count, timeout_rate) with one sort; NaN when empty."""
    window = getattr(view, "window", None)
    if window is None:
        p50 = view.latency_percentile_s(50)
        return p50, view.latency_percentile_s(90), p50, view.requests, 0.0
    in_order = window.latencies_s()
    n = len(in_order)
    if not n:
        return math.nan, math.nan, math.nan, 0, 0.0
    last = in_order[-RECENT_N:]
    lat = sorted(in_order)
    # Nearest rank, the same rule as proxy.state.OutcomeWindow.percentile_s.
    return (lat[min(n - 1, max(0, math.ceil(0.5 * n) - 1))],
            lat[min(n - 1, max(0, math.ceil(0.9 * n) - 1))],
            sum(last) / len(last), n, float(window.timeout_rate))


def _since_error_s(last_error_at: float | None, now: float) -> float:
    return SINCE_ERROR_CAP_S if last_error_at is None else min(max(0.0, now - last_error_at),
                                                               SINCE_ERROR_CAP_S)


_BACKEND0 = _IX[BACKEND_FEATURES[0]]
assert FEATURE_NAMES[_BACKEND0:] == BACKEND_FEATURES


def write_backend_row(row: np.ndarray, route_row: np.ndarray, missing_row: np.ndarray,
                      view: BackendView, slots: RouteSlots, now: float) -> None:
    """Backend columns of one row (the route-dependent ones as if no route data),
    and the backend's per-route-slot latency table (`route_row` ms, `missing_row` 0/1)."""
    ewma_ms = min(view.ewma_s() * 1e3, LATENCY_CAP_MS)
    p50_s, p90_s, recent_s, count, timeout_rate = _window_stats(view)
    inflight = min(float(view.inflight), INFLIGHT_CAP)
    load = view.reported_load
    no_load = load is None or math.isnan(load)
    # One slice assignment: per-element numpy writes cost ~100 ns each.
    row[_BACKEND0:] = (
        inflight,
        ewma_ms,
        ewma_ms,  # route_ewma_ms, overwritten by the caller for the request's slot
        0.0,  # ewma_cost_ms, derived per request
        0.0,  # route_cost_ms, derived per request
        1.0,  # route_missing, overwritten by the caller
        ewma_ms if math.isnan(p50_s) else min(p50_s * 1e3, LATENCY_CAP_MS),
        ewma_ms if math.isnan(p90_s) else min(p90_s * 1e3, LATENCY_CAP_MS),
        ewma_ms if math.isnan(recent_s) else min(recent_s * 1e3, LATENCY_CAP_MS),
        math.log1p(count),
        view.error_rate(),
        timeout_rate,
        _since_error_s(view.last_error_at, now),
        min(float(view.consecutive_failures), FAILURES_CAP),
        0.0 if no_load else min(max(float(load), 0.0), 10.0),  # type: ignore[arg-type]
        1.0 if no_load else 0.0,
    )
    # Route-specific latency: a mean per slot (several classes may share "other").
    per_class: Mapping[str, float] = getattr(view, "route_ewma_s", None) or {}
    if not per_class:
        route_row[:] = ewma_ms
        missing_row[:] = 1.0
        return
    sums = [0.0] * ROUTE_SLOTS
    counts = [0] * ROUTE_SLOTS
    for name, value_s in per_class.items():
        s = slots.slot(name)
        sums[s] += value_s
        counts[s] += 1
    route_row[:] = [min(sums[s] / counts[s] * 1e3, LATENCY_CAP_MS) if counts[s] else ewma_ms
                    for s in range(ROUTE_SLOTS)]
    missing_row[:] = [0.0 if c else 1.0 for c in counts]


def flat_view(array: np.ndarray) -> memoryview[float]:
    """A 1-D float32 memoryview of a C-contiguous float32 array (the same memory)."""
    return array.data.cast("B").cast("f")


def request_values(req: RequestInfo) -> tuple[float, float]:
    write = 1.0 if req.method.upper() in WRITE_METHODS else 0.0
    return write, math.log1p(max(0, min(req.body_size, 1 << 40)))


class FeatureMatrix:
    """A persistent float32 matrix, one row per ready backend, updated in place.

    `prepare(ready, req)` returns a (len(ready), N_FEATURES) view that is valid
    until the next call. It rebuilds everything when `ready` is a different
    tuple than last time (the cluster rebuilds it only on health or
    membership changes; retries pass a smaller tuple), refreshes all backend
    columns every `refresh_s` (decay, time since error), and otherwise only
    writes the inflight column, the derived costs and the request columns.
    Call `observed(backend, route_class)` (the columns one outcome moves) or
    `refresh(backend)` (all of them) after a backend's outcome was recorded:
    between two full refreshes (`refreshes` counts them) only those calls
    change a row's backend columns, which lets a caller re-score just the rows
    that changed: `copy_rows` gives those rows as `prepare` would, without
    updating the whole matrix (while `current_for(ready)`).
    """

    def __init__(self, route_classes: Sequence[str], clock: Clock = time.monotonic,
                 refresh_s: float = 0.25, capacity: int = 16) -> None:
        self.slots = RouteSlots(route_classes)
        self._clock = clock
        self.refresh_s = refresh_s
        self._alloc(capacity)
        self._ready: Sequence[BackendView] | None = None
        self._row_of: dict[str, int] = {}
        self._n = 0
        self._refreshed_at = -math.inf
        # Full refreshes so far: rows other than observed ones change only then.
        self.refreshes = 0
        # Inflight per row at the last prepare() (a new list each time).
        self.inflight_now: list[int] = []
        self._req_key: tuple[str, int, str] | None = None
        self._slot = OTHER_SLOT
        self._views(0)
        # A new object whenever rows are reassigned, so callers can cache per row.
        self.generation: object = object()

    def _alloc(self, capacity: int) -> None:
        self.matrix = np.zeros((capacity, N_FEATURES), dtype=DTYPE)
        self._route_ms = np.zeros((capacity, ROUTE_SLOTS), dtype=DTYPE)
        self._route_missing = np.ones((capacity, ROUTE_SLOTS), dtype=DTYPE)
        # Flat float32 views of the same memory, for element access from Python (~40 ns
        # each, against ~100 ns for a numpy scalar read or write).
        self._flat = flat_view(self.matrix)
        self._route_flat = flat_view(self._route_ms)
        self._missing_flat = flat_view(self._route_missing)

    @property
    def rows(self) -> int:
        return self._n

    def row(self, backend_id: str) -> int | None:
        """The row of a backend in the current matrix, None if it has none."""
        return self._row_of.get(backend_id)

    def prepare(self, ready: Sequence[BackendView], req: RequestInfo) -> np.ndarray:
        if ready is not self._ready:
            self._rebuild(ready)
            self.inflight_now = [s.inflight for s in ready]
        else:
            now = self._clock()
            if now - self._refreshed_at >= self.refresh_s:
                self._refresh_all(now)
            inflight = self.inflight_now = [s.inflight for s in ready]
            # Capped as in write_backend_row (and so in telemetry and training).
            self._inflight[:] = (inflight if max(inflight, default=0) <= INFLIGHT_CAP
                                 else [min(v, INFLIGHT_CAP) for v in inflight])
        if (req.route_class, req.body_size, req.method) != self._req_key:
            self._write_request(req)
        # Derived costs: (ewma, route_ewma) * (inflight + 1), two numpy calls.
        np.add(self._inflight1, 1.0, out=self._tmp)
        np.multiply(self._ewma2, self._tmp, out=self._cost2)
        return self._x

    def current_for(self, ready: Sequence[BackendView]) -> bool:
        """Whether the matrix holds `ready` and its full refresh is not due, so that
        `copy_rows` can read rows without a `prepare` first."""
        return ready is self._ready and self._clock() - self._refreshed_at < self.refresh_s

    def copy_rows(self, out: memoryview[float], rows: Sequence[int], request: memoryview[float],
                  inflight: Sequence[int], slot: int) -> None:
        """Rows `rows` of the matrix into the flat float32 `out`, one after another, as
        `prepare` would write them for a request whose columns are `request` (route slot
        `slot`), at `inflight` per row. Element by element through memoryviews: for a
        few rows that costs less than the numpy calls `prepare` makes for all of them.
        The costs are computed in double from float32 operands and rounded once on
        store, which gives the same float32 as numpy's float32 product."""
        src, route_ms, missing = self._flat, self._route_flat, self._missing_flat
        w = N_FEATURES
        for j, i in enumerate(rows):
            o, r = j * w, i * w
            out[o:o + w] = src[r:r + w]
            out[o:o + N_REQUEST] = request
            queue = min(inflight[i], INFLIGHT_CAP)
            out[o + INFLIGHT] = queue
            queue += 1
            route_ewma = route_ms[i * ROUTE_SLOTS + slot]
            out[o + ROUTE_EWMA] = route_ewma
            out[o + ROUTE_MISSING] = missing[i * ROUTE_SLOTS + slot]
            out[o + EWMA_COST] = src[r + EWMA] * queue
            out[o + ROUTE_COST] = route_ewma * queue

    def refresh(self, view: BackendView) -> None:
        """Recompute one backend's columns (after its outcome was recorded)."""
        i = self._row_of.get(view.id)
        if i is None or self._ready is None or i >= self._n or self._ready[i] is not view:
            return
        self._write_backend(i, view, self._clock())

    def _views(self, n: int) -> None:
        # Views built once per ready list, so a request creates none.
        x = self.matrix[:n]
        self._x = x
        self._inflight = x[:, INFLIGHT]
        self._inflight1 = x[:, INFLIGHT:INFLIGHT + 1]
        self._ewma2 = x[:, EWMA:EWMA + 2]
        self._cost2 = x[:, EWMA_COST:EWMA_COST + 2]
        self._tmp = np.zeros((n, 1), dtype=DTYPE)

    def observed(self, view: BackendView, route_class: str) -> None:
        """Cheap update after one outcome of `view`: the columns one outcome moves most
        (EWMA, last latencies, failures, the route's EWMA). Percentiles, rates and load
        follow at the next full refresh (within `refresh_s`)."""
        i = self._row_of.get(view.id)
        if i is None or self._ready is None or i >= self._n or self._ready[i] is not view:
            return
        flat, o = self._flat, i * N_FEATURES  # element writes: see _alloc
        ewma_ms = min(view.ewma_s() * 1e3, LATENCY_CAP_MS)
        flat[o + EWMA] = ewma_ms
        window = getattr(view, "window", None)
        if window is not None:
            last = window.last_latencies_s(RECENT_N)
            if last:
                flat[o + RECENT] = min(sum(last) / len(last) * 1e3, LATENCY_CAP_MS)
        flat[o + ERROR_RATE] = view.error_rate()
        flat[o + CONSECUTIVE] = min(float(view.consecutive_failures), FAILURES_CAP)
        if view.last_error_at is not None:
            flat[o + SINCE_ERROR] = _since_error_s(view.last_error_at, self._clock())
        per_class: Mapping[str, float] | None = getattr(view, "route_ewma_s", None)
        value_s = per_class.get(route_class) if per_class else None
        if value_s is not None:
            slot = self.slots.slot(route_class)
            if slot != OTHER_SLOT:  # "other" mixes classes: left to the full refresh
                r = i * ROUTE_SLOTS + slot
                self._route_flat[r] = min(value_s * 1e3, LATENCY_CAP_MS)
                self._missing_flat[r] = 0.0
                if slot == self._slot:
                    flat[o + ROUTE_EWMA] = self._route_flat[r]
                    flat[o + ROUTE_MISSING] = 0.0

    def _rebuild(self, ready: Sequence[BackendView]) -> None:
        n = len(ready)
        if n > self.matrix.shape[0]:
            self._alloc(max(n, 2 * self.matrix.shape[0]))
        self._ready = ready
        self._n = n
        self._views(n)
        self._row_of = {s.id: i for i, s in enumerate(ready)}
        self._req_key = None
        self.generation = object()
        self._refresh_all(self._clock())

    def _refresh_all(self, now: float) -> None:
        assert self._ready is not None
        for i, view in enumerate(self._ready):
            self._write_backend(i, view, now)
        self._refreshed_at = now
        self.refreshes += 1

    def _write_backend(self, i: int, view: BackendView, now: float) -> None:
        row = self.matrix[i]
        write_backend_row(row, self._route_ms[i], self._route_missing[i], view, self.slots, now)
        row[ROUTE_EWMA] = self._route_ms[i, self._slot]
        row[ROUTE_MISSING] = self._route_missing[i, self._slot]

    def _write_request(self, req: RequestInfo) -> None:
        x = self._x
        n = self._n
        write, body = request_values(req)
        slot = self.slots.slot(req.route_class)
        # The request block (req_write, req_body_log, route one-hot) in one broadcast.
        block = np.zeros(ROUTE0 + ROUTE_SLOTS, dtype=DTYPE)
        block[REQ_WRITE] = write
        block[REQ_BODY] = body
        block[ROUTE0 + slot] = 1.0
        x[:, :ROUTE0 + ROUTE_SLOTS] = block
        x[:, ROUTE_EWMA] = self._route_ms[:n, slot]
        x[:, ROUTE_MISSING] = self._route_missing[:n, slot]
        self._slot = slot
        self._req_key = (req.route_class, req.body_size, req.method)

    def build(self, ready: Sequence[BackendView], req: RequestInfo) -> np.ndarray:
        """A fresh (len(ready), N_FEATURES) array computed from scratch (a copy)."""
        return build(ready, req, self.slots, self._clock())


def build(ready: Sequence[BackendView], req: RequestInfo, slots: RouteSlots,
          now: float) -> np.ndarray:
    """Feature rows for `ready` and `req`, computed from scratch (slow path, ~µs per row)."""
    n = len(ready)
    x = np.zeros((n, N_FEATURES), dtype=DTYPE)
    route_ms = np.zeros(ROUTE_SLOTS, dtype=DTYPE)
    missing = np.ones(ROUTE_SLOTS, dtype=DTYPE)
    write, body = request_values(req)
    slot = slots.slot(req.route_class)
    for i, view in enumerate(ready):
        row = x[i]
        write_backend_row(row, route_ms, missing, view, slots, now)
        row[ROUTE_EWMA] = route_ms[slot]
        row[ROUTE_MISSING] = missing[slot]
    x[:, REQ_WRITE] = write
    x[:, REQ_BODY] = body
    x[:, ROUTE0 + slot] = 1.0
    np.multiply(x[:, EWMA:EWMA + 2], x[:, INFLIGHT:INFLIGHT + 1] + 1.0,
                out=x[:, EWMA_COST:EWMA_COST + 2])
    return x
