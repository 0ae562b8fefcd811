"""Edge cases a demanding user hits: cut streams, client-side body failures, odd request
targets, slow headers, reloads while traffic flows, WebSocket handshakes, h2c offers."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.state import Health
from tests.support import Backends, aiter_bytes, proxy_config, raw_backend, write_config


async def test_upstream_cut_mid_body_reaches_client_as_broken(start_proxy, client) -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    server, url = await raw_backend(half)
    try:
        proxy = await start_proxy(proxy_config({"cut": url}, retries={"attempts": 1}))
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(proxy.url + "/stream") as resp:
                assert resp.status == 200
                await resp.read()
    finally:
        server.close()


async def test_client_body_failures_do_not_count_against_backends(backends: Backends, start_proxy,
                                                                  client) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls, limits={"max_body_bytes": 1000},
                                           health={"active": {"enabled": False}}))
    for _ in range(5):  # chunked, so the size is only known while streaming
        async with client.post(proxy.url + "/upload", data=aiter_bytes(3000, chunk=512)) as resp:
            assert resp.status == 413
    state = proxy.worker.proxy.runtime.clusters["default"].cluster.get("a")
    assert state.health is Health.HEALTHY
    assert state.errors == 0


async def test_an_upload_slower_than_total_s_is_not_a_backend_timeout(backends: Backends,
                                                                      start_proxy) -> None:
    """total_s counts from the end of the request: a 1.2 s upload under total_s 0.5 s gets
    the backend's answer, and the backend is not blamed."""
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls, retries={"attempts": 1},
                                           timeouts={"per_try_s": 0.5, "total_s": 0.5}))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                 b"Connection: close\r\n\r\n")
    for byte in b"abcd":
        await asyncio.sleep(0.3)
        writer.write(bytes([byte]))
        await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    state = proxy.worker.proxy.runtime.clusters["default"].cluster.get("a")
    assert state.errors == 0


async def test_absolute_form_target_is_forwarded_by_its_path(backends: Backends, start_proxy) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"GET http://elsewhere.example/echo/x?q=1 HTTP/1.1\r\nHost: elsewhere.example\r\n"
                 b"Connection: close\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b'"path": "/echo/x?q=1"' in body


@pytest.mark.parametrize(("target", "path"), [(b"http://origin.example/echo/y?q=2", "/echo/y?q=2"),
                                             (b"http://user@origin.example:8080", "/")])
async def test_an_absolute_form_target_names_the_host(backends: Backends, start_proxy,
                                                      target: bytes, path: str) -> None:
    """RFC 9112 §3.2.2: the target's authority wins over the Host header, and an empty
    path is "/"."""
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if path == "/":  # routed and forwarded (the test backend has no "/": its 404)
        assert b"x-foretell-backend" in head.lower() and b"x-foretell-error" not in head.lower()
    else:
        assert head.startswith(b"HTTP/1.1 200"), head
        sent = json.loads(body)
        assert sent["path"] == path
        assert sent["headers"]["Host"] == "origin.example"
        assert sent["headers"]["X-Forwarded-Host"] == "origin.example"


async def test_an_http10_request_without_host_claims_no_forwarded_host(
        backends: Backends, start_proxy) -> None:
    """aiohttp takes the listen address for the host of a request that names none: it must
    not reach the backend as the host the client asked for."""
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"GET /echo HTTP/1.0\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    sent = json.loads(body)["headers"]
    assert "X-Forwarded-Host" not in sent
    assert sent["Host"] == urls["a"].removeprefix("http://")  # the backend's own authority


async def test_slow_drip_headers_hit_the_per_try_timeout(start_proxy, client) -> None:
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 100:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
        except (ConnectionError, OSError):
            pass

    server, url = await raw_backend(drip)
    try:
        proxy = await start_proxy(proxy_config({"drip": url}, retries={"attempts": 1},
                                               timeouts={"per_try_s": 0.5, "total_s": 1.0}))
        started = time.monotonic()
        async with client.get(proxy.url + "/x") as resp:
            assert resp.status == 504
            assert resp.headers["x-foretell-error"] == "upstream_timeout"
        assert time.monotonic() - started < 1.5
    finally:
        server.close()


async def test_long_download_survives_a_reload(backends: Backends, start_proxy) -> None:
    async def slow_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(15):
            await resp.write(b"z" * 1000)
            await asyncio.sleep(0.1)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/slow", slow_stream)
    urls = {"s": await backends.start("s", app)}
    cfg = proxy_config(urls)
    proxy = await start_proxy(cfg)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def download() -> int:
            async with session.get(proxy.url + "/slow") as resp:
                return len(await resp.read())

        task = asyncio.create_task(download())
        await asyncio.sleep(0.3)
        current = yaml.safe_load(proxy.worker.config_path.read_text())
        # A new cluster spec (a new decay time), the same backends: the download goes on.
        current["clusters"] = {"default": {"backends": current.pop("backends"),
                                           "health": current.pop("health"), "ewma_decay_s": 3.0,
                                           "policy": current.pop("policy")}}
        write_config(proxy.worker.config_path, current)
        assert await proxy.worker.reload()
        assert await task == 15_000


async def test_failed_reload_leaves_membership_and_health_untouched(backends: Backends,
                                                                    start_proxy) -> None:
    urls = {n: await backends.start(n) for n in ("a", "b")}
    proxy = await start_proxy(proxy_config({"a": urls["a"]}))
    cluster = proxy.worker.proxy.runtime.clusters["default"].cluster
    checker = proxy.worker.proxy.runtime.clusters["default"].checker
    bad = proxy_config(urls, policy={"kind": "tests.support.FailingPolicy"})
    bad["listen"] = yaml.safe_load(proxy.worker.config_path.read_text())["listen"]
    write_config(proxy.worker.config_path, bad)
    assert not await proxy.worker.reload()
    assert list(cluster.states) == ["a"]
    assert proxy.worker.proxy.runtime.clusters["default"].checker is checker


async def test_reload_stops_the_old_health_checker_at_once(backends: Backends, start_proxy) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    old_checker = proxy.worker.proxy.runtime.clusters["default"].checker
    cfg = yaml.safe_load(proxy.worker.config_path.read_text())
    cfg["health"] = {"active": {"enabled": True, "path": "/healthz", "interval_s": 0.5}}
    write_config(proxy.worker.config_path, cfg)
    assert await proxy.worker.reload()
    assert proxy.worker.proxy.runtime.clusters["default"].checker is not old_checker
    assert old_checker._stopped


async def test_a_new_ewma_decay_keeps_what_the_cluster_knows(backends: Backends, start_proxy,
                                                           client) -> None:
    """Reloading with another ewma_decay_s keeps each backend's state and the health
    checker (its ejections with it: before, a dead, ejected backend showed healthy until
    probes failed again), and applies the new time constant to the kept estimates."""
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    before = proxy.worker.proxy.runtime.clusters["default"]
    for _ in range(3):
        async with client.get(proxy.url + "/echo") as resp:
            assert resp.status == 200
    state = before.cluster.get("a")
    cfg = yaml.safe_load(proxy.worker.config_path.read_text())
    cfg["clusters"] = {"default": {"backends": cfg.pop("backends"), "health": cfg.pop("health"),
                                   "ewma_decay_s": 3.0, "policy": cfg.pop("policy")}}
    write_config(proxy.worker.config_path, cfg)
    assert await proxy.worker.reload()
    after = proxy.worker.proxy.runtime.clusters["default"]
    assert after.cluster.get("a") is state and state.requests == 3
    assert state.ewma.decay_s == 3.0
    assert after.checker is before.checker and after.policy is before.policy


async def test_a_reload_applies_what_it_can_and_the_config_in_effect_says_what_it_held(
        backends: Backends, start_proxy, caplog: pytest.LogCaptureFixture) -> None:
    """Listen address and parser limits stay as the worker runs them until a restart: the
    config in effect (/config, and the baseline of the next reload) keeps them, the log
    names them, and the rest of the file applies."""
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    cfg = yaml.safe_load(proxy.worker.config_path.read_text())
    changed = {**cfg, "listen": {"host": "127.0.0.1", "port": 1},
               "limits": {"max_header_count": 5}, "retries": {"attempts": 1}}
    write_config(proxy.worker.config_path, changed)
    with caplog.at_level(logging.WARNING, logger="foretell.worker"):
        assert await proxy.worker.reload()
    running = proxy.worker.proxy.runtime.config
    assert (running.listen.port, running.limits.max_header_count) == (0, 100)
    assert running.retries.attempts == 1
    assert "listen.port: 0 -> 1" in caplog.text and "limits.max_header_count: 100 -> 5" in caplog.text
    caplog.clear()
    write_config(proxy.worker.config_path, {**cfg, "retries": {"attempts": 1}})
    with caplog.at_level(logging.WARNING, logger="foretell.worker"):
        assert await proxy.worker.reload()
    assert "not applied" not in caplog.text  # back to what runs: nothing held


async def test_two_sighups_close_together_leave_the_worker_on_the_newer_file(
        backends: Backends, start_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads run in threads: the first, slow one (an anomaly model takes a second) finished
    after the second and overwrote it with the older file."""
    from proxy import worker as worker_module

    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    path = proxy.worker.config_path
    real_load = worker_module.load

    def slow_for_v1(p: object) -> object:
        loaded = real_load(p)  # type: ignore[arg-type]
        if loaded.config.retries.attempts == 2:
            time.sleep(1.0)
        return loaded

    monkeypatch.setattr(worker_module, "load", slow_for_v1)
    cfg = yaml.safe_load(path.read_text())
    write_config(path, {**cfg, "retries": {"attempts": 2}})
    first = asyncio.create_task(proxy.worker.reload())
    await asyncio.sleep(0.2)
    write_config(path, {**cfg, "retries": {"attempts": 4}})
    second = asyncio.create_task(proxy.worker.reload())
    assert await first and await second
    assert proxy.worker.proxy.runtime.config.retries.attempts == 4


async def test_websocket_bad_handshake_opens_nothing_upstream(backends: Backends, start_proxy,
                                                             client) -> None:
    opened = []

    async def ws(request: web.Request) -> web.WebSocketResponse:
        opened.append(1)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for _ in sock:
            pass
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    urls = {"w": await backends.start("w", app)}
    proxy = await start_proxy(proxy_config(urls))
    no_key = {"Connection": "Upgrade", "Upgrade": "websocket"}
    async with client.get(proxy.url + "/ws", headers=no_key) as resp:
        assert resp.status == 400
        assert resp.headers["x-foretell-error"] == "bad_request"
    await asyncio.sleep(0.2)
    assert opened == []


async def test_h2c_offer_is_declined_by_plain_http_and_100_continue_only_for_http11(
        backends: Backends, start_proxy, client) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    headers = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
               "HTTP2-Settings": "AAMAAABkAAQAAP__"}
    async with client.get(proxy.url + "/echo", headers=headers) as resp:
        assert resp.status == 200
        sent = {k.lower() for k in (await resp.json())["headers"]}
    assert not sent & {"upgrade", "http2-settings", "connection"}
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"POST /echo HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nok")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert b"100 Continue" not in raw and raw.startswith(b"HTTP/1.0 200")


async def test_client_cannot_spoof_forwarded_proto(backends: Backends, start_proxy, client) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    async with client.get(proxy.url + "/echo", headers={"X-Forwarded-Proto": "https"}) as resp:
        sent = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
    assert sent["x-forwarded-proto"] == "http"
