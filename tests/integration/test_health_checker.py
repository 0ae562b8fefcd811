"""A real HealthChecker (real prober, real detectors) on a real Cluster with loopback backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from health.checker import HealthChecker
from health.config import HealthConfig
from proxy.state import Backend, Cluster, Health
from tests.integration.health_support import Knob, Traffic, drive, knob_app
from tests.support import Backends


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    fleet = Backends()
    yield fleet
    await fleet.close()


async def start_fleet(backends: Backends, n: int) -> tuple[Cluster, dict[str, Knob]]:
    knobs = {f"b{i}": Knob() for i in range(n)}
    members = [Backend(b, await backends.start(b, knob_app(k))) for b, k in knobs.items()]
    return Cluster("c", members), knobs


async def wait_for(pred: object, timeout_s: float) -> float:
    started = time.monotonic()
    while not pred():  # type: ignore[operator]
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not true within {timeout_s} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_failing_probes_eject_and_passing_probes_readmit(backends: Backends) -> None:
    cluster, knobs = await start_fleet(backends, 3)
    cfg = HealthConfig.model_validate({
        "active": {"interval_s": 0.1, "ejected_interval_s": 0.05, "jitter_s": 0.01},
        "ejection": {"base_ejection_s": 0.3, "readmit_jitter_s": 0.0}})
    hc = HealthChecker(cluster, cfg)
    await hc.start()
    try:
        await asyncio.sleep(0.3)
        assert all(s.health is Health.HEALTHY for s in cluster.states.values())
        knobs["b1"].healthz_status = 500
        # fall 3 at ~0.1 s: out within half a second.
        took = await wait_for(lambda: cluster.get("b1").health is Health.EJECTED, 1.0)
        assert 0.15 < took < 0.6
        assert cluster.get("b1").health_reason.startswith("ejected by active: active probe down")
        assert "unexpected status 500" in cluster.get("b1").health_reason
        await asyncio.sleep(0.5)
        assert cluster.get("b1").health is Health.EJECTED
        knobs["b1"].healthz_status = 200
        await wait_for(lambda: cluster.get("b1").health is Health.HEALTHY, 1.0)
        assert "b1" in {s.id for s in cluster.ready()}
        info = hc.describe("b1")
        assert info["probe"]["up"] is True  # type: ignore[index]
        assert any("re-admitted" in h for h in info["history"])  # type: ignore[attr-defined]
    finally:
        await hc.stop()


async def test_5xx_backend_ejected_within_one_second_under_traffic(backends: Backends) -> None:
    cluster, knobs = await start_fleet(backends, 4)
    hc = HealthChecker(cluster, HealthConfig())  # shipped defaults
    await hc.start()
    traffic = Traffic()
    try:
        async with aiohttp.ClientSession() as session:
            run = asyncio.create_task(drive(cluster, session, 2.5, 200.0, traffic))
            await asyncio.sleep(1.0)
            knobs["b2"].status = 503
            took = await wait_for(lambda: cluster.get("b2").health is Health.EJECTED, 2.0)
            await run
        assert took < 1.0
        assert [s.id for s in cluster.states.values() if s.health is not Health.HEALTHY] == ["b2"]
        assert "5xx" in cluster.get("b2").health_reason
    finally:
        await hc.stop()


async def test_slow_but_200_backend_ejected_fleet_kept(backends: Backends) -> None:
    cluster, knobs = await start_fleet(backends, 4)
    for i, k in enumerate(knobs.values()):
        k.delay_s = 0.002 * (1 + i)
    hc = HealthChecker(cluster, HealthConfig())
    await hc.start()
    traffic = Traffic()
    try:
        async with aiohttp.ClientSession() as session:
            run = asyncio.create_task(drive(cluster, session, 3.0, 200.0, traffic))
            await asyncio.sleep(1.0)
            assert all(s.health is Health.HEALTHY for s in cluster.states.values())
            knobs["b0"].delay_s = 0.1
            took = await wait_for(lambda: cluster.get("b0").health is Health.EJECTED, 2.0)
            await run
        assert took < 2.0
        assert cluster.get("b0").health_reason.startswith("ejected by latency: p90")
        assert sum(s.health is Health.EJECTED for s in cluster.states.values()) == 1
        assert traffic.failed == 0
    finally:
        await hc.stop()


async def test_killed_backend_ejected_then_readmitted_after_restart(backends: Backends) -> None:
    cluster, knobs = await start_fleet(backends, 4)
    port = int(cluster.get("b3").backend.url.rsplit(":", 1)[1])
    cfg = HealthConfig.model_validate({
        "active": {"interval_s": 0.2, "ejected_interval_s": 0.1, "jitter_s": 0.02},
        "ejection": {"base_ejection_s": 0.5}})
    hc = HealthChecker(cluster, cfg)
    await hc.start()
    traffic = Traffic()
    try:
        async with aiohttp.ClientSession() as session:
            run = asyncio.create_task(drive(cluster, session, 3.0, 100.0, traffic))
            await asyncio.sleep(0.5)
            await backends.stop("b3")
            took = await wait_for(lambda: cluster.get("b3").health is Health.EJECTED, 1.0)
            assert took < 0.3
            assert "transport errors in a row (connect" in cluster.get("b3").health_reason
            await asyncio.sleep(0.3)
            await backends.start("b3", knob_app(knobs["b3"]), port=port)
            await wait_for(lambda: cluster.get("b3").health is Health.HEALTHY, 2.0)
            readmitted_at = cluster.get("b3").admitted_at
            await run
        assert readmitted_at > cluster.get("b0").admitted_at
        # Only the requests sent before the ejection failed: at most a couple.
        assert traffic.failed <= 3, traffic
    finally:
        await hc.stop()
