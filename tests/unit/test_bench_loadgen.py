"""bench.loadgen: schedules hold their rate, loopback only, latency from the intended time."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest

from bench.fleet import Event, Fleet, ServiceTime, SimBackend, free_ports
from bench.loadgen import (
    ERR_DEADLINE,
    ERR_NONE,
    LoadgenError,
    LoadSpec,
    Records,
    RouteMix,
    check_loopback,
    run,
    schedule_s,
)


def test_poisson_schedule_holds_its_rate() -> None:
    spec = LoadSpec(url="http://127.0.0.1:1", rate_rps=1000.0, duration_s=20.0)
    times = schedule_s(spec, random.Random(3))
    # 20,000 expected; Poisson sd is ~141, so 3% is > 4 sd.
    assert len(times) == pytest.approx(20_000, rel=0.03)
    gaps = np.diff(times)
    assert float(gaps.mean()) == pytest.approx(0.001, rel=0.03)
    # Exponential gaps: coefficient of variation ~1.
    assert float(gaps.std() / gaps.mean()) == pytest.approx(1.0, abs=0.05)
    # And the rate holds in every second, not only on average.
    per_s = np.histogram(times, bins=20, range=(0, 20))[0]
    assert per_s.min() > 880 and per_s.max() < 1120


def test_constant_schedule_is_evenly_spaced() -> None:
    spec = LoadSpec(url="http://127.0.0.1:1", rate_rps=200.0, duration_s=1.0, schedule="constant")
    times = schedule_s(spec, random.Random(0))
    assert len(times) == 199
    assert np.allclose(np.diff(times), 0.005)


def test_rate_profile_ramps() -> None:
    spec = LoadSpec(url="http://127.0.0.1:1", rate_rps=1000.0, duration_s=10.0,
                    rate_profile=((0.0, 0.5), (10.0, 1.5)))
    assert spec.rate_at(0.0) == 500.0
    assert spec.rate_at(5.0) == pytest.approx(1000.0)
    assert spec.rate_at(99.0) == 1500.0
    times = np.array(schedule_s(spec, random.Random(1)))
    first, last = (times < 1.0).sum(), (times >= 9.0).sum()
    assert first == pytest.approx(550, rel=0.12)
    assert last == pytest.approx(1450, rel=0.08)


@pytest.mark.parametrize("url", ["http://10.0.0.1:80", "http://example.com", "http://[2001:db8::1]:80",
                                 "ftp://127.0.0.1"])
def test_non_loopback_targets_are_refused(url: str) -> None:
    with pytest.raises(LoadgenError):
        check_loopback(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:80", "http://127.8.9.10", "http://[::1]:8080",
                                 "http://localhost:9"])
def test_loopback_targets_are_accepted(url: str) -> None:
    check_loopback(url)


def test_records_round_trip(tmp_path: Path) -> None:
    rec = Records(intended_s=np.array([0.1, 0.2]), latency_s=np.array([0.01, 2.0]),
                  send_lag_s=np.zeros(2), status=np.array([200, 0], dtype=np.int32),
                  error=np.array([ERR_NONE, ERR_DEADLINE], dtype=np.int8),
                  backend=np.array([0, -1], dtype=np.int16), route=np.zeros(2, dtype=np.int16),
                  backend_ids=["b0"], routes=["/"], mode="open", meta={"seed": 4})
    rec.save(tmp_path / "r.npz")
    back = Records.load(tmp_path / "r.npz")
    assert back.backend_ids == ["b0"] and back.mode == "open" and back.meta == {"seed": 4}
    assert back.ok.tolist() == [True, False]
    assert np.array_equal(back.latency_s, rec.latency_s)


async def test_latency_counts_from_intended_time_through_a_stall() -> None:
    (port,) = free_ports(1)
    spec_b = SimBackend(id="s", port=port, slots=1000, service=ServiceTime("constant", 1.0),
                        events=(Event("stall", 0.4, 0.9),))
    with Fleet([spec_b], max_lifetime_s=30) as fleet:
        origin = time.monotonic() + 0.3  # the timeline restarts once the backend is up
        fleet.set_origin(origin)
        spec = LoadSpec(url=f"http://127.0.0.1:{port}", rate_rps=200.0, duration_s=1.5,
                        schedule="constant", deadline_s=1.0, start_at_s=origin, origin_s=origin,
                        routes=(RouteMix("/a"), RouteMix("/b", method="POST", body_bytes=100)))
        rec = await run(spec)
    assert len(rec) in (299, 300) and rec.backend_ids == ["s"]  # float steps of 5 ms
    assert set(rec.routes) == {"/a", "/b"}
    held = (rec.intended_s >= 0.42) & (rec.intended_s < 0.88)
    # Held until the stall ends: latency = 0.9 - intended, whatever the send time.
    expected = 0.9 - rec.intended_s[held]
    assert np.all(rec.latency_s[held] >= expected - 0.002)
    # Upper slack: the server's own wake-up after the stall on a busy 2-core box.
    assert np.all(rec.latency_s[held] <= expected + 0.25)
    assert rec.ok.all()
    free = rec.intended_s >= 1.0
    assert np.median(rec.latency_s[free]) < 0.02


async def test_deadline_counts_as_failure_at_the_deadline() -> None:
    (port,) = free_ports(1)
    spec_b = SimBackend(id="s", port=port, slots=1000, service=ServiceTime("constant", 1.0),
                        events=(Event("stall", 0.2, 5.0),))
    with Fleet([spec_b], max_lifetime_s=30) as fleet:
        origin = time.monotonic() + 0.3  # the timeline restarts once the backend is up
        fleet.set_origin(origin)
        spec = LoadSpec(url=f"http://127.0.0.1:{port}", rate_rps=50.0, duration_s=0.6,
                        schedule="constant", deadline_s=0.3, start_at_s=origin, origin_s=origin)
        t0 = time.monotonic()
        rec = await run(spec)
        elapsed = time.monotonic() - t0
    late = rec.intended_s >= 0.21
    assert late.sum() >= 15
    assert np.all(rec.error[late] == ERR_DEADLINE) and np.all(rec.status[late] == 0)
    assert np.allclose(rec.latency_s[late], 0.3)
    assert np.all(rec.error[rec.intended_s < 0.19] == ERR_NONE)
    # Bounded: the run ends by the last deadline, not when the stall ends.
    assert elapsed < (origin - t0) + 0.6 + 0.3 + 0.5


async def test_failures_are_counted_by_the_proxys_reason() -> None:
    """The proxy's own 5xx answers are counted by their x-foretell-error reason (its 404s
    are not failures), with a few bodies kept; a backend's 5xx passed on is told apart."""
    from aiohttp import web

    from bench.health_bench import failures

    answered = 0

    async def answer(request: web.Request) -> web.Response:
        nonlocal answered
        answered += 1
        if request.path == "/proxy":
            return web.Response(status=503, text=f"503 no_healthy_backend: try {answered}",
                                headers={"x-foretell-error": "no_healthy_backend"})
        if request.path == "/missing":
            return web.Response(status=404, headers={"x-foretell-error": "no_route"})
        return web.Response(status=500 if request.path == "/backend" else 200)

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    (port,) = free_ports(1)
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        spec = LoadSpec(url=f"http://127.0.0.1:{port}", rate_rps=200.0, duration_s=0.5,
                        schedule="constant", deadline_s=1.0,
                        routes=(RouteMix("/proxy"), RouteMix("/missing"), RouteMix("/backend"),
                                RouteMix("/ok")))
        rec = await run(spec)
    finally:
        await runner.cleanup()
    routes = np.asarray(rec.routes)[rec.route]
    n_proxy = int((routes == "/proxy").sum())
    n_backend = int((routes == "/backend").sum())
    assert n_proxy > 5 and n_backend > 5
    assert rec.meta["proxy_errors"] == {"no_healthy_backend": n_proxy}
    examples = rec.meta["proxy_error_examples"]
    assert len(examples) == 5 and all(e.startswith("503 no_healthy_backend: try ") for e in examples)
    assert failures(rec) == {"no_healthy_backend": n_proxy, "backend_5xx": n_backend}
