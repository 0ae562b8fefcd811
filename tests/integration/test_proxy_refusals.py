"""Well-formed requests the proxy must still refuse (proxy/request_checks.py), and a
WebSocket upgrade a backend answers without upgrading. Raw sockets: clients do not
send these."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from tests.support import Backends, proxy_config


async def exchange(port: int, raw: bytes) -> bytes:
    """Send `raw`, read until the proxy closes the connection (it must)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.mark.parametrize(("raw", "status", "reason"), [
    # aiohttp reads CONNECT as bodiless: its body would be the next request.
    (b"CONNECT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 35\r\n\r\n"
     b"GET /echo/smuggled HTTP/1.1\r\nHost: a\r\n\r\n", 501, b"not_implemented"),
    (b"GET /echo HTTP/2.0\r\nHost: a\r\n\r\n", 505, b"http_version_not_supported"),
    (b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
     501, b"not_implemented"),
    (b"POST /upload HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400, b"bad_request"),
    (b"GET /echo HTTP/1.1\r\nHost: a b\r\n\r\n", 400, b"bad_request"),
    (b"GET /echo HTTP/1.1\r\nHost: a@b\r\n\r\n", 400, b"bad_request"),
    (b"GET /echo HTTP/1.1\r\nHost: [::1\r\n\r\n", 400, b"bad_request"),
    (b"GET /echo HTTP/1.1\r\nHost: a:99999\r\n\r\n", 400, b"bad_request"),
    (b"GET /echo HTTP/1.1\r\nX-Host: a\r\n\r\n", 400, b"bad_request"),  # RFC 9112 §3.2
])
async def test_refused_with_a_reason_and_the_connection_closed(
        backends: Backends, start_proxy, raw: bytes, status: int, reason: bytes) -> None:
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
        seen.append(request.path)
        return await handler(request)

    from tests.support import backend_app

    app = backend_app("a")
    app.middlewares.append(record)
    urls = {"a": await backends.start("a", app)}
    proxy = await start_proxy(proxy_config(urls))
    answer = await exchange(proxy.worker.listen_port, raw)
    head = answer.split(b"\r\n\r\n")[0]
    assert head.split(b"\r\n")[0].split(b" ")[1] == str(status).encode(), answer[:300]
    assert b"x-foretell-error: " + reason in head.lower()
    # One answer, then the close: nothing smuggled.
    assert answer.lower().count(b"x-foretell-error") == 1 and b" 200 " not in answer
    await asyncio.sleep(0.1)
    assert seen == []


@pytest.mark.parametrize("host", [b"example.com:8080", b"[::1]:80", b"10.0.0.1", b""])
async def test_valid_hosts_pass(backends: Backends, start_proxy, host: bytes) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    answer = await exchange(proxy.worker.listen_port,
                            b"GET /echo HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


async def test_a_websocket_upgrade_answered_with_200_is_a_502(backends: Backends, start_proxy,
                                                              client) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="not a socket")

    app = web.Application()
    app.router.add_get("/ws", page)
    urls = {"w": await backends.start("w", app)}
    proxy = await start_proxy(proxy_config(urls))
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    async with client.get(proxy.url + "/ws", headers=headers) as resp:
        assert resp.status == 502
        assert resp.headers["x-foretell-error"] == "upstream_refused_upgrade"
