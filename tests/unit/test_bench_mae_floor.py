"""bench/mae_floor.py: the service-noise floor behind the MAE gate, and the queueing-aware
estimate beside it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bench.fleet import Event, ServiceTime, SimBackend
from bench.mae_floor import (
    FloorReport,
    factor_mix,
    floor_ms,
    idle_noise_ms,
    mad_factor,
    queue_cell,
    queue_estimate_ms,
    timeline_s,
)
from bench.scenarios import BASE_SERVICE, Scenario, get
from policies.features import INFLIGHT, N_FEATURES, ROUTE0


@pytest.mark.parametrize(("service", "expected"), [
    (ServiceTime("lognormal", mean_ms=40.0, lognormal_sigma=0.5), math.erf(0.5 / math.sqrt(2))),
    (ServiceTime("exponential", mean_ms=10.0), math.log(2)),  # E|X - median| = mean * ln 2
    (ServiceTime("constant", mean_ms=10.0), 0.0),
])
def test_mad_factor_matches_closed_forms(service: ServiceTime, expected: float) -> None:
    assert mad_factor(service) == pytest.approx(expected, abs=0.005)


def _rows(slots: list[int]) -> np.ndarray:
    x = np.zeros((len(slots), N_FEATURES), dtype=np.float32)
    x[np.arange(len(slots)), ROUTE0 + np.asarray(slots)] = 1.0
    return x


def test_floor_follows_backend_and_route() -> None:
    sc = get("request_aware")  # even backends: /search 0.5x, /render 4x; odd: /search 2x
    classes = ["search", "render", "api", "other"]
    ids = np.array([b"b0", b"b0", b"b1", b"b1"])
    out = floor_ms(sc, ids, _rows([0, 1, 0, 2]), classes)
    k = mad_factor(sc.backends[0].service) * 40.0
    assert out == pytest.approx([0.5 * k, 4.0 * k, 2.0 * k, 1.0 * k], rel=1e-6)


def test_floor_uses_backend_speed_and_single_route() -> None:
    sc = get("skew")  # b6 and b7 4x slower; one route, no route classes configured
    out = floor_ms(sc, np.array([b"b0", b"b6"]), _rows([0, 0]), ["default"])
    assert out[1] == pytest.approx(4.0 * out[0])


def test_floor_refuses_telemetry_from_another_fleet() -> None:
    with pytest.raises(ValueError, match="b99"):
        floor_ms(get("homogeneous"), np.array([b"b99"]), _rows([0]), ["default"])
    with pytest.raises(ValueError, match="route class 'upload'"):
        floor_ms(get("request_aware"), np.array([b"b0"]), _rows([0]), ["upload", "other"])


def test_idle_noise_uses_only_idle_rows_per_backend_and_route() -> None:
    x = _rows([0, 0, 0, 1, 1, 0])
    x[:, INFLIGHT] = [0, 0, 0, 0, 0, 3]
    ids = np.array([b"b0", b"b0", b"b0", b"b0", b"b0", b"b0"])
    y = np.array([10.0, 20.0, 30.0, 100.0, 100.0, 999.0])
    rows, noise = idle_noise_ms(ids, x, y)
    # Route 0: median 20, deviations 10 + 0 + 10; route 1: 0 + 0; the busy row is left out.
    assert (rows, noise) == (5, pytest.approx(20.0 / 5))


def test_last_slot_stands_for_every_later_class_and_takes_the_cheapest() -> None:
    sc = get("request_aware")  # b0: /search 0.5x, /render 4x, /api 1x
    # Unknown route classes land in the last slot too, so it may be any route: the cheapest.
    out = floor_ms(sc, np.array([b"b0", b"b0"]), _rows([7, 1]), ["api", "other", "render"])
    k = mad_factor(sc.backends[0].service) * 40.0
    assert out == pytest.approx([0.5 * k, 1.0 * k], rel=1e-6)
    with pytest.raises(ValueError, match="x2"):
        floor_ms(sc, np.array([b"b0"]), _rows([0]), ["api", "x2"])


# The queueing-aware estimate (an estimate, not a bound).

def _one(service: ServiceTime, slots: int, inflight: int) -> tuple[float, float]:
    return queue_cell(service, slots, 1.0, ((1.0, 1.0),), inflight)


def test_queue_estimate_without_a_wait_is_the_service_only_figure() -> None:
    for service in (BASE_SERVICE, ServiceTime("exponential", mean_ms=10.0)):
        for slots, inflight in ((1, 0), (2, 0), (2, 1), (8, 7)):
            assert _one(service, slots, inflight)[1] == pytest.approx(mad_factor(service), rel=0.01)


def test_queue_estimate_grows_with_inflight_and_is_deterministic() -> None:
    mads = [_one(BASE_SERVICE, 2, k)[1] for k in range(1, 10)]
    assert all(b > a for a, b in itertools.pairwise(mads))
    assert mads[-1] > 1.5 * mad_factor(BASE_SERVICE)
    queue_cell.cache_clear()
    assert [_one(BASE_SERVICE, 2, k)[1] for k in range(1, 10)] == mads


@pytest.mark.parametrize(("service", "slots", "inflight", "median", "mad"), [
    # Constant D = 1: the one in service has U(0, 1) left, so L ~ U(1, 2) (or U(2, 3)).
    (ServiceTime("constant", mean_ms=40.0), 1, 1, 1.5, 0.25),
    (ServiceTime("constant", mean_ms=40.0), 1, 2, 2.5, 0.25),
    # Two busy slots: L = 1 + min(U1, U2), a Beta(1, 2) with median 1 - 1/sqrt 2.
    (ServiceTime("constant", mean_ms=40.0), 2, 2, 2.0 - 1.0 / math.sqrt(2),
     1.0 / 3.0 - (1.0 - 1.0 / math.sqrt(2))
     + 2.0 * ((1.0 - 1.0 / math.sqrt(2)) ** 2 - (1.0 - 1.0 / math.sqrt(2)) ** 3 / 3.0)),
    # Exponential: a length-biased draw at a uniform point leaves Exp(1) (a fresh draw at a
    # uniform point would leave a mean of 0.5), so L ~ Gamma(2, 1): median 1.6783.
    (ServiceTime("exponential", mean_ms=10.0), 1, 1, 1.67835,
     2.0 - 1.67835 + 2.0 * (1.67835 - 2.0 + math.exp(-1.67835) * (2.0 + 1.67835))),
])
def test_queue_cell_matches_hand_computed_queues(service: ServiceTime, slots: int, inflight: int,
                                                 median: float, mad: float) -> None:
    got_median, got_mad = _one(service, slots, inflight)
    assert got_median == pytest.approx(median, rel=0.01)
    assert got_mad == pytest.approx(mad, rel=0.02)


def test_queue_cell_weights_the_routes_in_flight() -> None:
    # One constant route costing 3 and one costing 0 in flight, half of the requests each: the
    # busy slot holds the costly one (length bias), so L ~ 1 + U(0, 3).
    c = ServiceTime("constant", mean_ms=10.0)
    median, mad = queue_cell(c, 1, 1.0, ((0.0, 0.5), (3.0, 0.5)), 1)
    assert (median, mad) == (pytest.approx(2.5, rel=0.01), pytest.approx(0.75, rel=0.02))


def test_timeline_starts_each_run_at_its_first_decision() -> None:
    # Two runs (Telemetry.spans) starting at their first decisions, 100 s and 200 s.
    starts = [100.0, 200.0]
    assert timeline_s(starts, np.array([100.5, 101.2, 200.0, 203.0])) == pytest.approx(
        [0.5, 1.2, 0.0, 3.0])


def test_event_factor_from_the_scripted_timeline() -> None:
    gray_b1 = get("gray").backends[1]  # 5x slower from 3 s
    assert factor_mix(gray_b1, 2.9) == ((1.0, 1.0),)
    assert factor_mix(gray_b1, 3.0) == ((5.0, 1.0),)
    assert factor_mix(get("bimodal").backends[0], 1.0) == ((1.0, 0.5), (3.0, 0.5))


def test_queue_estimate_on_tiny_telemetry() -> None:
    b = SimBackend(id="b0", port=0, slots=1, service=ServiceTime("constant", mean_ms=40.0),
                   events=(Event("slowdown", 5.0, 10.0, factor=2.0),))
    sc = Scenario("tiny", "T0", "one constant backend, 2x from 5 s", (b,))
    x = _rows([0, 0, 0, 0])
    x[:, INFLIGHT] = [0, 1, 1, 2]
    out = queue_estimate_ms(sc, np.array([b"b0"] * 4), x, ["default"],
                            np.array([1.0, 1.0, 6.0, 6.0]))
    # Idle: no noise; one ahead: U(0, 40) ms left, MAD 10 ms; at 2x: 20 ms.
    assert out == pytest.approx([0.0, 10.0, 20.0, 20.0], rel=0.02, abs=1e-9)


def test_report_prints_the_estimate_beside_the_floor() -> None:
    r = FloorReport(rows=10, floor_ms=10.0, ewma_ms=20.0, model_ms=16.0, idle_rows=3,
                    idle_ms=12.0, queue_ms=15.0)
    text = "\n".join(r.lines())
    assert "0.75x the EWMA's (an estimate, not a bound" in text
    assert "reachable gap closed            40.0%" in text
    assert "gap closed to the ESTIMATE      80.0%" in text
    assert "ESTIMATE" not in "\n".join(FloorReport(10, 10.0, 20.0, None, 3, 12.0).lines())
