"""Real aiohttp backends whose behaviour a test can change, and a small traffic driver.

The driver forwards real HTTP requests over loopback through `cluster.track`,
the same accounting the proxy uses, so the health checker sees real outcomes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.state import ERROR_CONNECT, ERROR_RESET, ERROR_TIMEOUT, Cluster, Outcome


@dataclass
class Knob:
    status: int = 200
    delay_s: float = 0.0
    healthz_status: int = 200
    healthz_delay_s: float = 0.0


def knob_app(knob: Knob) -> web.Application:
    async def work(_: web.Request) -> web.Response:
        if knob.delay_s:
            await asyncio.sleep(knob.delay_s)
        return web.Response(status=knob.status, text="w")

    async def healthz(_: web.Request) -> web.Response:
        if knob.healthz_delay_s:
            await asyncio.sleep(knob.healthz_delay_s)
        return web.Response(status=knob.healthz_status, text="h")

    app = web.Application()
    app.router.add_get("/work", work)
    app.router.add_get("/healthz", healthz)
    return app


@dataclass
class Traffic:
    sent: int = 0
    failed: int = 0


async def drive(cluster: Cluster, session: aiohttp.ClientSession, duration_s: float,
                rps: float, traffic: Traffic) -> None:
    """Open-loop round robin over the ready list for `duration_s`."""
    rr = itertools.count()
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        ready = cluster.ready()
        state = ready[next(rr) % len(ready)]
        started = time.monotonic()
        with cluster.track(state) as t:
            try:
                async with session.get(state.backend.url + "/work") as resp:
                    await resp.read()
                    outcome = Outcome(resp.status, time.monotonic() - started)
            except aiohttp.ClientConnectorError:
                outcome = Outcome(0, time.monotonic() - started, ERROR_CONNECT)
            except TimeoutError:
                outcome = Outcome(0, time.monotonic() - started, ERROR_TIMEOUT)
            except aiohttp.ClientError:
                outcome = Outcome(0, time.monotonic() - started, ERROR_RESET)
            t.finish(outcome)
        traffic.sent += 1
        traffic.failed += outcome.failed

    end = time.monotonic() + duration_s
    next_at = time.monotonic()
    while next_at < end:
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += 1.0 / rps
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    if tasks:
        await asyncio.gather(*tasks)
