"""bench.fleet: service-time distributions, scripted events, and real backend processes."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import aiohttp
import pytest

from bench.fleet import (
    BACKEND_HEADER,
    LOAD_HEADER,
    Event,
    Fleet,
    FleetError,
    ServiceTime,
    SimBackend,
    Timeline,
    demo_fleet,
    fleet_capacity_rps,
    free_ports,
)


@pytest.mark.parametrize("dist", ["constant", "exponential", "lognormal", "pareto"])
def test_service_time_mean_matches_declared(dist: str) -> None:
    st = ServiceTime(dist, mean_ms=20.0, lognormal_sigma=0.8, pareto_alpha=3.0)  # type: ignore[arg-type]
    rng = random.Random(42)
    samples = [st.sample_ms(rng) for _ in range(100_000)]
    # Pareto with alpha 3 has a heavy tail: its sample mean converges slowest.
    assert statistics.fmean(samples) == pytest.approx(20.0, rel=0.03)
    assert min(samples) >= 0.0
    if dist == "constant":
        assert set(samples) == {20.0}


def test_service_time_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="pareto_alpha"):
        ServiceTime("pareto", pareto_alpha=1.0)
    with pytest.raises(ValueError, match="distribution"):
        ServiceTime("uniform")  # type: ignore[arg-type]


def test_route_multiplier_uses_longest_prefix_and_capacity_follows() -> None:
    b = SimBackend(id="a", port=1, slots=4, service=ServiceTime("constant", 10.0), speed=2.0,
                   route_cost={"/": 1.0, "/render": 3.0, "/render/big": 5.0})
    assert b.route_multiplier("/render/big/x") == 5.0
    assert b.route_multiplier("/render/small") == 3.0
    assert b.route_multiplier("/search") == 1.0
    # 4 slots / (10 ms x 2 speed x (0.5*1 + 0.5*3)) = 4 / 40 ms = 100 req/s.
    assert b.capacity_rps({"/search": 1, "/render": 1}) == pytest.approx(100.0)
    assert fleet_capacity_rps([b, b]) == pytest.approx(400.0)


def test_timeline_events_at_exact_times() -> None:
    tl = Timeline((Event("slowdown", 1.0, 2.0, factor=4.0), Event("stall", 3.0, 3.5),
                    Event("fail", 4.0, 5.0, probability=0.5, status=502),
                    Event("flap", 6.0, 10.0, period_s=1.0)), random.Random(0))
    assert tl.factor(0.99) == 1.0
    assert tl.factor(1.0) == 4.0
    assert tl.factor(2.0) == 1.0
    assert tl.stall_until(3.2) == 3.5
    assert tl.stall_until(3.5) is None
    fail = tl.failing(4.5)
    assert fail is not None and fail.status == 502 and fail.probability == 0.5
    assert tl.failing(6.5) is None  # flap: healthy in even halves
    assert tl.failing(7.5) is not None
    assert tl.failing(8.2) is None
    assert tl.gray(4.5) and not tl.gray(3.2)  # a stall is not a gray failure


def test_bimodal_switches_within_declared_periods() -> None:
    ev = Event("bimodal", 0.0, 100.0, factor=3.0, min_period_s=0.05, period_s=0.5)
    tl = Timeline((ev,), random.Random(1))
    ts = [i * 0.001 for i in range(20_000)]
    factors = [tl.factor(t) for t in ts]
    assert set(factors) == {1.0, 3.0}
    # Phase lengths stay within [min_period_s, period_s].
    runs, start = [], 0
    for i in range(1, len(factors)):
        if factors[i] != factors[i - 1]:
            runs.append((i - start) * 0.001)
            start = i
    assert len(runs) > 20
    assert min(runs) >= 0.05 - 0.0011 and max(runs) <= 0.5 + 0.0011
    # About half the time slow.
    assert statistics.fmean(f == 3.0 for f in factors) == pytest.approx(0.5, abs=0.15)


def test_fleet_rejects_duplicate_ids() -> None:
    with pytest.raises(FleetError, match="unique"):
        Fleet([SimBackend(id="a", port=1), SimBackend(id="a", port=2)])


def test_fleet_refuses_a_port_another_process_listens_on() -> None:
    """Else that process passes for the backend: the demo routed to a foreign server."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fleet = Fleet([SimBackend(id="a", port=port)], max_lifetime_s=30)
        with pytest.raises(FleetError, match=f"backend a: 127.0.0.1:{port} is already in use"):
            fleet.start()


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, float, dict[str, str]]:
    t0 = time.monotonic()
    async with session.get(url) as r:
        await r.read()
        return r.status, time.monotonic() - t0, dict(r.headers)


async def test_one_slot_backend_queues_concurrent_requests() -> None:
    (port,) = free_ports(1)
    spec = SimBackend(id="q", port=port, slots=1, service=ServiceTime("constant", 20.0),
                      load_header=True)
    with Fleet([spec], max_lifetime_s=30):
        async with aiohttp.ClientSession() as s:
            await _get(s, f"http://127.0.0.1:{port}/warm")
            results = await asyncio.gather(*(_get(s, f"http://127.0.0.1:{port}/x")
                                             for _ in range(5)))
    lat = sorted(r[1] for r in results)
    # One worker: the k-th request waits for k-1 others: ~20, 40, 60, 80, 100 ms.
    for k, value in enumerate(lat, 1):
        assert value >= 0.020 * k - 0.003, lat
    assert lat[-1] < 0.100 + 0.080, lat
    assert all(r[0] == 200 and r[2][BACKEND_HEADER] == "q" for r in results)
    assert all(r[2][LOAD_HEADER] == "TEXT cpu_utilization=1.000" for r in results)


async def test_gray_failure_keeps_healthz_green_and_crash_resets() -> None:
    p1, p2 = free_ports(2)
    fail = SimBackend(id="f", port=p1, service=ServiceTime("constant", 30.0),
                      events=(Event("fail", 0.0, 60.0, probability=1.0, status=503),))
    crash = SimBackend(id="c", port=p2, service=ServiceTime("constant", 1.0),
                       events=(Event("crash", 0.0, 2.0),))
    fleet = Fleet([fail, crash], max_lifetime_s=30)
    fleet.start(defer_origin=True)  # no event until set_origin()
    try:
        async with aiohttp.ClientSession() as s:
            status, _, _ = await _get(s, f"http://127.0.0.1:{p2}/before")
            assert status == 200
            # Restart the timeline now that every backend is up (shared monotonic clock).
            origin = time.monotonic() + 0.3
            fleet.set_origin(origin)
            await asyncio.sleep(max(0.0, origin - time.monotonic()) + 0.1)
            with pytest.raises(aiohttp.ClientError):
                await _get(s, f"http://127.0.0.1:{p2}/during")
            status, lat, headers = await _get(s, f"http://127.0.0.1:{p1}/api")
            assert status == 503 and lat < 0.025 and headers[BACKEND_HEADER] == "f"
            status, _, _ = await _get(s, f"http://127.0.0.1:{p1}/healthz")
            assert status == 200
            await asyncio.sleep(max(0.0, origin + 2.0 - time.monotonic()))
            # It listens again at the end of the crash (allow scheduling slack on a busy box).
            status, deadline = 0, time.monotonic() + 3.0
            while status != 200 and time.monotonic() < deadline:
                try:
                    status, _, _ = await _get(s, f"http://127.0.0.1:{p2}/after")
                except aiohttp.ClientError:
                    await asyncio.sleep(0.02)
            assert status == 200
    finally:
        fleet.stop()


def test_fleet_processes_stop_by_themselves_after_max_lifetime() -> None:
    ports = free_ports(2)
    # The lifetime counts from each child's own start, so start-up on a busy machine fits in it.
    fleet = Fleet(demo_fleet(ports), max_lifetime_s=3.0)
    fleet.start()
    try:
        deadline = time.monotonic() + 15.0
        while any(fleet.alive(b.id) for b in fleet.backends) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(fleet.alive(b.id) for b in fleet.backends)
    finally:
        fleet.stop()
