"""The feature schema: names, missing values, and the fast path equal to a rebuild."""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

import numpy as np
import pytest

from policies.base import RequestInfo
from policies.features import (
    EWMA,
    FEATURE_NAMES,
    INFLIGHT,
    INFLIGHT_CAP,
    N_FEATURES,
    N_REQUEST,
    OTHER_SLOT,
    ROUTE0,
    ROUTE_EWMA,
    ROUTE_MISSING,
    SCHEMA_VERSION,
    FeatureMatrix,
    RouteSlots,
    SchemaError,
    build,
    check_schema,
    flat_view,
)
from proxy.state import Backend, Cluster, Outcome


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def make_cluster(clock: Clock, n: int = 3) -> Cluster:
    return Cluster("c", [Backend(f"b{i}", f"http://127.0.0.1:{9000 + i}") for i in range(n)],
                   clock=clock)


def record(cluster: Cluster, backend_id: str, latency_s: float, route: str = "api",
           status: int = 200, kind: str | None = None) -> None:
    state = cluster.get(backend_id)
    with cluster.track(state) as t:
        t.finish(Outcome(status, latency_s, kind, 0, route))


def test_names_unique_and_schema_check() -> None:
    assert len(set(FEATURE_NAMES)) == N_FEATURES
    check_schema(SCHEMA_VERSION, FEATURE_NAMES)
    with pytest.raises(SchemaError, match="schema version"):
        check_schema(SCHEMA_VERSION + 1, FEATURE_NAMES)
    with pytest.raises(SchemaError, match="feature names"):
        check_schema(SCHEMA_VERSION, FEATURE_NAMES[::-1])


def test_route_slots_bounded_with_other() -> None:
    slots = RouteSlots([f"r{i}" for i in range(20)])
    assert slots.slot("r0") == 0
    assert slots.slot("r6") == 6
    assert slots.slot("r7") == OTHER_SLOT
    assert slots.slot("unknown") == OTHER_SLOT


def test_missing_values_have_stand_ins_and_indicators() -> None:
    clock = Clock()
    cluster = make_cluster(clock, 1)
    x = build(cluster.ready(), RequestInfo(route_class="api"), RouteSlots(["api"]), clock())
    row = x[0]
    assert np.all(np.isfinite(x))
    assert row[col("p50_ms")] == pytest.approx(row[EWMA])  # no window yet -> EWMA
    assert row[col("window_n_log")] == 0.0
    assert row[col("load_missing")] == 1.0 and row[col("load")] == 0.0
    assert row[ROUTE_MISSING] == 1.0 and row[ROUTE_EWMA] == pytest.approx(row[EWMA])
    assert row[col("since_error_s")] == 300.0
    cluster.set_reported_load("b0", 0.4)
    record(cluster, "b0", 0.004)
    clock.t += 2.0
    record(cluster, "b0", 0.001, status=503)
    clock.t += 3.0
    row = build(cluster.ready(), RequestInfo(route_class="api"), RouteSlots(["api"]), clock())[0]
    assert row[col("load")] == pytest.approx(0.4) and row[col("load_missing")] == 0.0
    # 5xx responses carry a service time, so they move the EWMA (weight 0.2).
    assert row[ROUTE_MISSING] == 0.0 and row[ROUTE_EWMA] == pytest.approx(3.4)
    assert row[col("recent_ms")] == pytest.approx(2.5)  # mean of the last two
    assert row[col("error_rate")] == pytest.approx(0.5)
    assert row[col("since_error_s")] == pytest.approx(3.0)
    assert row[col("window_n_log")] == pytest.approx(math.log1p(2))


def test_request_columns() -> None:
    clock = Clock()
    cluster = make_cluster(clock)
    slots = RouteSlots(["api", "static"])
    x = build(cluster.ready(), RequestInfo(method="POST", route_class="static", body_size=1000),
              slots, clock())
    assert np.all(x[:, col("req_write")] == 1.0)
    assert np.allclose(x[:, col("req_body_log")], math.log1p(1000))
    assert np.all(x[:, ROUTE0 + 1] == 1.0) and x[:, ROUTE0:ROUTE0 + 8].sum() == len(x)


def four_backends(refresh_s: float) -> tuple[Clock, Cluster, FeatureMatrix, Any]:
    """Four backends and a matrix over them for route classes api and static."""
    clock = Clock()
    cluster = make_cluster(clock, 4)
    return clock, cluster, FeatureMatrix(["api", "static"], clock, refresh_s), cluster.ready()


def test_fast_path_matches_rebuild() -> None:
    clock, cluster, fm, ready = four_backends(refresh_s=0.25)
    rng = np.random.default_rng(0)
    for step in range(60):
        b = f"b{step % 4}"
        route = "api" if step % 3 else "static"
        record(cluster, b, float(rng.uniform(0.001, 0.02)), route=route)
        fm.refresh(cluster.get(b))
        req = RequestInfo(route_class=["api", "static", "other"][step % 3], body_size=step)
        x = fm.prepare(ready, req).copy()
        clock.t += 0.001
        expected = build(ready, req, fm.slots, clock.t - 0.001)
        # Time-decayed columns may lag by up to refresh_s; everything else is exact.
        np.testing.assert_allclose(x, expected, rtol=2e-3, atol=1e-3)


def _primed_two_backends() -> tuple[Clock, Any, FeatureMatrix, Any, RequestInfo]:
    """Two backends, a matrix that never refreshes by itself, one prepare done."""
    clock = Clock()
    cluster = make_cluster(clock, 2)
    fm = FeatureMatrix(["api"], clock, refresh_s=1000.0)
    ready = cluster.ready()
    req = RequestInfo(route_class="api")
    fm.prepare(ready, req)
    return clock, cluster, fm, ready, req


def test_inflight_is_fresh_without_refresh() -> None:
    _, cluster, fm, ready, req = _primed_two_backends()
    with cluster.track(cluster.get("b1")):
        x = fm.prepare(ready, req)
        assert x[1, INFLIGHT] == 1.0 and x[0, INFLIGHT] == 0.0
        assert x[1, col("ewma_cost_ms")] == pytest.approx(2 * x[1, EWMA])
    assert fm.prepare(ready, req)[1, INFLIGHT] == 0.0


def test_new_ready_list_rebuilds_rows() -> None:
    clock = Clock()
    cluster = make_cluster(clock, 3)
    fm = FeatureMatrix(["api"], clock)
    req = RequestInfo(route_class="api")
    gen = fm.generation
    assert fm.prepare(cluster.ready(), req).shape == (3, N_FEATURES)
    subset = cluster.ready()[1:]
    assert fm.prepare(subset, req).shape == (2, N_FEATURES)
    assert fm.generation is not gen and fm.row("b1") == 0


def test_observed_updates_the_fast_columns() -> None:
    clock, cluster, fm, ready, req = _primed_two_backends()
    for latency_s in (0.004, 0.008, 0.012):
        record(cluster, "b1", latency_s)
        fm.observed(cluster.get("b1"), "api")
    x = fm.prepare(ready, req)
    fresh = build(ready, req, fm.slots, clock())
    for name in ("ewma_ms", "recent_ms", "route_ewma_ms", "route_missing", "error_rate",
                 "consecutive_failures", "route_cost_ms"):
        assert x[1, col(name)] == pytest.approx(fresh[1, col(name)], rel=1e-5), name


def test_copied_rows_equal_prepared_ones_for_another_request() -> None:
    """copy_rows (partial rescores) writes, element by element, the rows prepare() would:
    for a request other than the matrix's last one, at the inflight it is given."""
    _, cluster, fm, ready = four_backends(refresh_s=1000.0)
    rng = np.random.default_rng(1)
    for step in range(40):
        b = f"b{step % 4}"
        record(cluster, b, float(rng.uniform(0.001, 0.05)), route=("api", "static")[step % 2],
               status=500 if step % 7 == 0 else 200)
    fm.prepare(ready, RequestInfo(route_class="api"))
    with cluster.track(cluster.get("b1")), cluster.track(cluster.get("b1")), \
            cluster.track(cluster.get("b3")):
        record(cluster, "b2", 0.03, route="static")
        fm.observed(cluster.get("b2"), "static")
        requests = [RequestInfo(method="POST", route_class="static", body_size=700),
                    RequestInfo(route_class="api"), RequestInfo(route_class="other")]
        for req, other in zip(requests, requests[1:] + requests[:1], strict=True):
            expected = fm.prepare(ready, req).copy()
            inflight = [s.inflight for s in ready]
            request = flat_view(expected[0, :N_REQUEST].copy())
            with cluster.track(cluster.get("b0")), cluster.track(cluster.get("b3")):
                # The matrix now holds another request's columns and other inflights.
                fm.prepare(ready, other)
            rows = [3, 1, 2, 0, 1]
            out = np.full((len(rows), N_FEATURES), -1.0, dtype=np.float32)
            fm.copy_rows(flat_view(out), rows, request, inflight, fm.slots.slot(req.route_class))
            np.testing.assert_array_equal(out, expected[rows])


def test_inflight_above_the_cap_is_capped_alike_in_build_prepare_and_copied_rows() -> None:
    """Telemetry (build) caps inflight; serving must feed the model the same value."""
    clock, cluster, fm, ready = four_backends(refresh_s=1000.0)
    req = RequestInfo(route_class="api")
    fm.prepare(ready, req)  # built before the flood: prepare() must cap by itself
    over = int(INFLIGHT_CAP) + 50
    with ExitStack() as stack:
        for _ in range(over):
            stack.enter_context(cluster.track(cluster.get("b2")))
        expected = build(ready, req, fm.slots, clock())
        x = fm.prepare(ready, req).copy()
        assert x[2, INFLIGHT] == INFLIGHT_CAP
        np.testing.assert_array_equal(x, expected)
        out = np.zeros((1, N_FEATURES), dtype=np.float32)
        fm.copy_rows(flat_view(out), [2], flat_view(x[0, :N_REQUEST].copy()), fm.inflight_now,
                     fm.slots.slot("api"))
        np.testing.assert_array_equal(out[0], x[2])
