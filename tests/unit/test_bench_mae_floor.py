"""bench/mae_floor.py: the service-noise floor behind the MAE gate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.fleet import ServiceTime
from bench.mae_floor import floor_ms, idle_noise_ms, mad_factor
from bench.scenarios import get
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
