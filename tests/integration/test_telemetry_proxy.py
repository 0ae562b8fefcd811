"""The learning loop through a real proxy: telemetry from live traffic -> train -> the
learned policy serving from the trained file, with real aiohttp backends on loopback."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from proxy.telemetry import SUFFIX, read_telemetry
from tests.support import Backends, fetch_json, proxy_config
from train.cli import main as train_main

ROUTES = [{"name": "sleep", "path_prefix": "/sleep"}, {"name": "echo", "path_prefix": "/echo"}]


async def test_telemetry_train_and_serve(
        backends: Backends, start_proxy: Callable[[dict[str, Any]], Awaitable[Any]],
        client: aiohttp.ClientSession, tmp_path: Path) -> None:
    urls = {n: await backends.start(n) for n in ("a", "b", "c")}
    tel = tmp_path / "telemetry"
    proxy = await start_proxy(proxy_config(
        urls, routes=ROUTES,
        policy={"kind": "explore", "base": "round_robin", "epsilon": 0.5},
        telemetry={"enabled": True, "path": str(tel), "sample_rate": 1.0,
                   "flush_interval_s": 0.05}))
    for i in range(90):
        path = f"/sleep/{1 + i % 3}" if i % 2 else "/echo/x"
        async with client.get(proxy.url + path) as resp:
            assert resp.status == 200
            await resp.read()
    await asyncio.sleep(0.3)  # the writer thread flushes every 50 ms
    files = sorted(tel.glob(f"*{SUFFIX}"))
    assert files
    tf = read_telemetry(files[0])
    assert tf.header["route_classes"] == ["sleep", "echo"]
    rec = tf.records
    chosen = rec[rec["chosen"] == 1]
    assert len(chosen) == 90 and np.all(chosen["status"] == 200)
    assert np.all(rec["n_ready"] == 3) and len(rec) == 270
    # explore over round robin logs exact propensities: 0.5/3 + 0.5*[base's choice]
    props = {round(float(p), 4) for p in chosen["propensity"]}
    assert props <= {round(0.5 / 3, 4), round(0.5 / 3 + 0.5, 4)}
    assert {b.decode() for b in chosen["backend"]} == {"a", "b", "c"}

    # Requests were sequential (inflight always 0), so only the monotone model is sane.
    model = tmp_path / "latency.onnx"
    assert train_main(["latency", "--data", str(tel), "--out", str(model), "--candidates",
                       "hgb", "--target", "latency", "--force",
                       "--max-inference-us", "1000000"]) == 0
    learned = await start_proxy(proxy_config(
        urls, routes=ROUTES, policy={"kind": "onnx_latency", "model_path": str(model),
                                     "min_history": 0}))
    for _ in range(10):
        async with client.get(learned.url + "/echo/y") as resp:
            assert resp.status == 200
    async with client.get(learned.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert re.search(r'foretell_model_info\{.*kind="hgb".*\} 1\.0', text)
    assert re.search(r'foretell_model_active\{cluster="default"\} 1\.0', text)
    # /backends explains the picks: per request class, each backend's score and its terms.
    snapshot = await fetch_json(client, learned.admin_url + "/backends")
    state = snapshot["clusters"]["default"]["policy_state"]
    assert state["serving"] is True
    terms = state["scores"]["echo GET"]["backends"]
    assert set(terms) == {"a", "b", "c"}
    assert all(t["predicted_ms"] > 0 and t["score"] > 0 for t in terms.values())


async def records_dropped_when_the_client_leaves(url: str, wait_s: float) -> float:
    """GET `url` and give up after `wait_s`; the telemetry records counted as client_gone."""
    from proxy.telemetry import DROPPED

    gone = DROPPED.labels("client_gone")
    before = gone._value.get()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=wait_s)) as session:
        try:
            async with session.get(url) as resp:
                await resp.read()
        except TimeoutError:
            pass
    for _ in range(50):  # the proxy notices the client is gone
        if gone._value.get() > before:
            break
        await asyncio.sleep(0.05)
    dropped: float = gone._value.get() - before
    return dropped


async def test_a_decision_whose_client_left_is_counted_not_lost_silently(
        backends: Backends, start_proxy: Callable[[dict[str, Any]], Awaitable[Any]],
        tmp_path: Path) -> None:
    urls = {n: await backends.start(n) for n in ("a", "b")}
    proxy = await start_proxy(proxy_config(
        urls, telemetry={"enabled": True, "path": str(tmp_path), "sample_rate": 1.0}))
    # One record per candidate backend.
    assert await records_dropped_when_the_client_leaves(proxy.url + "/sleep/2000", 0.2) == 2


async def test_a_client_that_leaves_while_a_small_body_is_read_is_counted(
        start_proxy: Callable[[dict[str, Any]], Awaitable[Any]], tmp_path: Path) -> None:
    """The head has come, the body stalls, the client gives up: counted, as while waiting
    for the head."""
    from tests.support import raw_backend

    done = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await done.wait()  # stalls until the test is over, then closes its side
        writer.close()

    server, url = await raw_backend(stall)
    try:
        proxy = await start_proxy(proxy_config(
            {"a": url}, telemetry={"enabled": True, "path": str(tmp_path), "sample_rate": 1.0}))
        assert await records_dropped_when_the_client_leaves(proxy.url + "/x", 0.3) == 1
    finally:
        done.set()
        await asyncio.sleep(0.05)
        server.close()
