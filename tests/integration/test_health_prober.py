"""The HTTP prober against real loopback servers."""

from __future__ import annotations

import pytest

from health.config import ActiveProbe
from health.prober import HttpProber
from proxy.state import Backend
from tests.integration.health_support import Knob, knob_app
from tests.support import Backends, free_port


@pytest.fixture
async def backends() -> Backends:  # type: ignore[misc]
    fleet = Backends()
    yield fleet
    await fleet.close()


async def test_probe_outcomes(backends: Backends) -> None:
    knob = Knob()
    url = await backends.start("a", knob_app(knob))
    prober = HttpProber(ActiveProbe(timeout_s=0.2, expected_statuses=[200, 204]))
    b = Backend("a", url)
    try:
        r = await prober.probe(b)
        assert r.ok and r.status == 200 and 0 < r.rtt_s < 0.2
        knob.healthz_status = 503
        r = await prober.probe(b)
        assert not r.ok and r.status == 503 and r.error == "unexpected status 503"
        knob.healthz_status, knob.healthz_delay_s = 200, 0.5
        r = await prober.probe(b)
        assert not r.ok and r.error == "timeout after 0.2 s"
        assert 0.19 < r.rtt_s < 0.4
        r = await prober.probe(Backend("dead", f"http://127.0.0.1:{free_port()}"))
        assert not r.ok and r.error.startswith("connect error")
    finally:
        await prober.close()
