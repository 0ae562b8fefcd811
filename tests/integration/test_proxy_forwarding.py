"""The data plane against real aiohttp backends on loopback, proxy in this event loop."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.state import Health
from tests.support import Backends, aiter_bytes, fetch_json, proxy_config


async def test_round_robin_spreads_and_marks_backend(backends: Backends, start_proxy, client) -> None:
    urls = {n: await backends.start(n) for n in ("a", "b")}
    proxy = await start_proxy(proxy_config(urls))
    seen = []
    for _ in range(6):
        async with client.get(proxy.url + "/echo/x?q=1") as resp:
            assert resp.status == 200
            body = await resp.json()
            assert resp.headers["x-foretell-backend"] == body["backend"]
            assert body["path"] == "/echo/x?q=1"
            seen.append(body["backend"])
    assert seen == ["a", "b"] * 3


async def test_hop_by_hop_stripped_and_forwarding_headers_added(backends: Backends, start_proxy,
                                                               client) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    headers = {"Connection": "keep-alive, X-Secret", "X-Secret": "s", "Keep-Alive": "timeout=5",
               "TE": "trailers", "Proxy-Authorization": "Basic x", "X-Forwarded-For": "10.9.9.9",
               "X-Request-Id": "req-42", "X-Kept": "yes"}
    async with client.get(proxy.url + "/echo", headers=headers) as resp:
        sent = (await resp.json())["headers"]
        assert resp.headers["X-Request-Id"] == "req-42"
        assert resp.headers["Via"].endswith("1.1 foretell")
    lowered = {k.lower(): v for k, v in sent.items()}
    for gone in ("x-secret", "keep-alive", "te", "proxy-authorization"):
        assert gone not in lowered
    assert lowered["x-kept"] == "yes"
    assert lowered["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert lowered["x-forwarded-proto"] == "http"
    assert lowered["x-request-id"] == "req-42"
    assert lowered["via"] == "1.1 foretell"
    # nothing the client did not send: no Accept, Accept-Encoding, User-Agent or Content-Type
    async with client.post(proxy.url + "/echo", data=aiter_bytes(10), skip_auto_headers=(
            "Accept", "Accept-Encoding", "User-Agent", "Content-Type")) as resp:
        sent = {k.lower() for k in (await resp.json())["headers"]}
    assert not sent & {"accept", "accept-encoding", "user-agent", "content-type"}, sent
    async with client.get(proxy.url + "/echo") as resp:
        generated = {k.lower(): v for k, v in (await resp.json())["headers"].items()}["x-request-id"]
        assert len(generated) == 32 and resp.headers["X-Request-Id"] == generated


async def test_post_body_chunked_both_ways_head_204_304(backends: Backends, start_proxy, client) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    payload = b"p" * 300_000
    async with client.post(proxy.url + "/echo", data=payload) as resp:
        body = await resp.json()
        assert body["method"] == "POST" and body["body_len"] == len(payload)
        assert body["body_sha"] == hashlib.sha256(payload).hexdigest()
    # chunked request (no Content-Length) and chunked response (no length known)
    async with client.post(proxy.url + "/upload", data=aiter_bytes(200_000)) as resp:
        assert (await resp.json())["received"] == 200_000
    async with client.get(proxy.url + "/bytes/500000") as resp:
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        assert len(await resp.read()) == 500_000
    async with client.head(proxy.url + "/echo") as resp:
        assert resp.status == 200 and int(resp.headers["Content-Length"]) > 0
        assert await resp.read() == b""
    for code in (204, 304):
        async with client.get(proxy.url + f"/status/{code}") as resp:
            assert resp.status == code and await resp.read() == b""


async def test_expect_100_continue(backends: Backends, start_proxy) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_websocket_pass_through(backends: Backends, start_proxy, client) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    async with client.ws_connect(proxy.url.replace("http", "ws") + "/ws") as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "a:hi"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive(timeout=5)).data == b"\x00\x01"


async def test_errors_have_status_and_reason(backends: Backends, start_proxy, client) -> None:
    urls = {"a": await backends.start("a")}
    dead = {"dead": "http://127.0.0.1:1"}
    cfg = proxy_config(urls, timeouts={"per_try_s": 0.3, "total_s": 1.0},
                       retries={"attempts": 1})
    proxy = await start_proxy(cfg)
    async with client.get(proxy.url + "/sleep/2000") as resp:
        assert resp.status == 504
        assert resp.headers["x-foretell-error"] == "upstream_timeout"
    proxy2 = await start_proxy(proxy_config(dead))
    async with client.get(proxy2.url + "/echo") as resp:
        assert resp.status == 502
        assert resp.headers["x-foretell-error"] == "upstream_connect_failure"
    cluster = proxy.worker.proxy.runtime.clusters["default"].cluster
    cluster.panic_routing = False
    cluster.set_health("a", Health.EJECTED, "test")
    async with client.get(proxy.url + "/echo") as resp:
        assert resp.status == 503
        assert resp.headers["x-foretell-error"] == "no_healthy_backend"


async def test_upstream_reset_is_502(backends: Backends, start_proxy, client) -> None:
    async def reset(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(1)
        return web.Response()

    app = web.Application()
    app.router.add_get("/{tail:.*}", reset)
    urls = {"r": await backends.start("r", app)}
    proxy = await start_proxy(proxy_config(urls, retries={"attempts": 1}))
    async with client.get(proxy.url + "/x") as resp:
        assert resp.status == 502
        assert resp.headers["x-foretell-error"] == "upstream_reset"


async def test_body_and_header_limits(backends: Backends, start_proxy, client) -> None:
    urls = {"a": await backends.start("a")}
    cfg = proxy_config(urls, limits={"max_body_bytes": 10_000, "max_header_bytes": 4096})
    proxy = await start_proxy(cfg)
    async with client.post(proxy.url + "/upload", data=b"x" * 20_000) as resp:
        assert resp.status == 413
        assert resp.headers["x-foretell-error"] == "request_body_too_large"
    async with client.post(proxy.url + "/upload", data=aiter_bytes(50_000, chunk=4096)) as resp:
        assert resp.status == 413
    async with client.get(proxy.url + "/echo", headers={"X-Big": "v" * 5000}) as resp:
        assert resp.status == 431
        assert resp.headers["x-foretell-error"] == "request_headers_too_large"
    many = {f"X-H{i}": "v" * 60 for i in range(80)}  # each line fits, the total does not
    async with client.get(proxy.url + "/echo", headers=many) as resp:
        assert resp.status == 431
    async with client.post(proxy.url + "/upload", data=b"x" * 9_000) as resp:
        assert resp.status == 200


async def test_malformed_request_is_400_and_not_forwarded(backends: Backends, start_proxy) -> None:
    hits = []

    async def count(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", count)
    urls = {"a": await backends.start("a", app)}
    proxy = await start_proxy(proxy_config(urls))
    for raw in (b"GARBAGE\r\n\r\n", b"GET /x HTTP/9.9\r\nHost: x\r\n\r\n", b"GET /x\x00 HTTP/1.1\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
        writer.write(raw)
        await writer.drain()
        head = await asyncio.wait_for(reader.read(4096), 5)
        assert head.split(b"\r\n", 1)[0].split(b" ")[1] == b"400", head
        assert b"x-foretell-error: bad_request" in head
        writer.close()
    assert hits == []


async def test_slow_headers_are_cut_off(backends: Backends, start_proxy) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls, timeouts={"client_header_s": 0.5}))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes the headers
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
    writer.close()


@pytest.mark.parametrize("timeouts", [{"client_idle_s": 1.0},
                                      {"client_header_s": 1.0, "client_idle_s": 60.0}])
async def test_slow_headers_of_a_later_request_are_cut_off_too(
        backends: Backends, start_proxy, timeouts: dict[str, float]) -> None:
    """On a kept-alive connection the next head must be complete within client_idle_s
    of the previous response (dripping bytes does not restart that clock), and within
    client_header_s of its first byte."""
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls, timeouts=timeouts))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    started = time.monotonic()
    closed_after_s = None
    try:
        for byte in b"GET / HTTP/1.1\r\nX-Drip: " + b"d" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            if await _closed_within(reader, 0.1):
                closed_after_s = time.monotonic() - started
                break
    except ConnectionError:
        closed_after_s = time.monotonic() - started
    writer.close()
    assert closed_after_s is not None and closed_after_s < 2.5


async def test_the_rest_of_a_body_after_an_early_answer_is_not_a_slow_head(
        backends: Backends, start_proxy) -> None:
    """The backend answers a POST (405) before the client sent all of its body; the rest
    comes after the answer. Those bytes are not the start of a head: the idle connection
    stays open for client_idle_s, not client_header_s."""
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(
        urls, timeouts={"client_header_s": 1.0, "client_idle_s": 60.0}))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"POST /status/200 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nxxxxx")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    writer.write(b"yyyyy")  # the rest of the body, after the answer
    await writer.drain()
    await asyncio.sleep(1.5)  # idle: past client_header_s, well within client_idle_s
    writer.write(b"GET /echo/again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]


async def _closed_within(reader: asyncio.StreamReader, wait_s: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), wait_s) == b""
    except TimeoutError:
        return False


async def test_killed_backend_costs_no_failed_gets(backends: Backends, start_proxy, client) -> None:
    urls = {n: await backends.start(n) for n in ("a", "b", "c")}
    proxy = await start_proxy(proxy_config(urls, policy={"kind": "round_robin"}))
    statuses: list[int] = []

    async def one() -> None:
        async with client.get(proxy.url + "/echo") as resp:
            await resp.read()
            statuses.append(resp.status)

    for i in range(1000):
        if i == 300:
            await backends.stop("b")
        await asyncio.gather(*(one() for _ in range(1))) if i % 2 else await one()
    assert len(statuses) == 1000
    assert statuses.count(200) == 1000, {s: statuses.count(s) for s in set(statuses)}


async def test_retry_on_gateway_error_goes_elsewhere(backends: Backends, start_proxy, client) -> None:
    async def bad(request: web.Request) -> web.Response:
        return web.Response(status=503, text="sick")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", bad)
    urls = {"sick": await backends.start("sick", app), "ok": await backends.start("ok")}
    proxy = await start_proxy(proxy_config(urls))
    # a POST with a body is not replayed: the client sees the backend's answer
    got = set()
    for _ in range(4):
        async with client.post(proxy.url + "/echo", data=b"once") as resp:
            got.add(resp.status)
    assert got == {200, 503}
    for _ in range(10):
        async with client.get(proxy.url + "/echo") as resp:
            assert resp.status == 200
            assert resp.headers["x-foretell-backend"] == "ok"


async def test_routes_by_path_host_method_and_header(backends: Backends, start_proxy, client) -> None:
    urls = {n: await backends.start(n) for n in ("s1", "r1", "h1", "d1")}
    cfg = proxy_config({})
    del cfg["backends"], cfg["policy"], cfg["health"]
    off = {"active": {"enabled": False}}
    cfg["clusters"] = {n: {"backends": [{"id": n, "url": u}], "health": off} for n, u in urls.items()}
    cfg["routes"] = [
        {"name": "search", "path_prefix": "/search", "cluster": "s1"},
        {"name": "api", "host": "*.example.com", "methods": ["POST"], "cluster": "r1"},
        {"name": "canary", "headers": {"x-canary": "*"}, "cluster": "h1"},
        {"name": "rest", "cluster": "d1"},
    ]
    proxy = await start_proxy(cfg)

    async def backend_of(method: str, path: str, headers: dict[str, str] | None = None) -> str:
        async with client.request(method, proxy.url + path, headers=headers or {}) as resp:
            return resp.headers["x-foretell-backend"]

    assert await backend_of("GET", "/search/x") == "s1"
    assert await backend_of("POST", "/echo", {"Host": "a.example.com"}) == "r1"
    assert await backend_of("GET", "/echo", {"Host": "a.example.com"}) == "d1"
    assert await backend_of("GET", "/echo", {"X-Canary": "1"}) == "h1"
    assert await backend_of("GET", "/other") == "d1"


async def test_admin_endpoints(backends: Backends, start_proxy, client) -> None:
    urls = {n: await backends.start(n) for n in ("a", "b")}
    proxy = await start_proxy(proxy_config(urls))
    for _ in range(4):
        async with client.get(proxy.url + "/load") as resp:
            await resp.read()
    snapshot = await fetch_json(client, proxy.admin_url + "/backends")
    entries = {b["id"]: b for b in snapshot["clusters"]["default"]["backends"]}
    assert entries["a"]["requests"] == 2 and entries["b"]["requests"] == 2
    assert entries["a"]["reported_load"] == 0.42
    assert {"id", "url", "health", "inflight", "ewma_ms", "requests", "errors"} <= set(entries["a"])
    assert snapshot["clusters"]["default"]["panic"] is False
    assert snapshot["clusters"]["default"]["health_panic"] is False
    async with client.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert 'foretell_upstream_requests_total{backend="a",cluster="default",code_class="2xx"}' in text
    assert "foretell_upstream_latency_seconds_bucket" in text
    assert 'foretell_policy_picks_total{cluster="default",policy="round_robin"}' in text
    config = await fetch_json(client, proxy.admin_url + "/config")
    assert config["config"]["clusters"]["default"]["policy"]["kind"] == "round_robin"
    for path in ("/live", "/ready"):
        async with client.get(proxy.admin_url + path) as resp:
            assert resp.status == 200


async def test_client_disconnect_releases_inflight(backends: Backends, start_proxy) -> None:
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    timeout = aiohttp.ClientTimeout(total=0.2)
    async with aiohttp.ClientSession(timeout=timeout) as short:
        try:
            async with short.get(proxy.url + "/sleep/1500") as resp:
                await resp.read()
        except TimeoutError:
            pass
    await asyncio.sleep(0.3)
    state = proxy.worker.proxy.runtime.clusters["default"].cluster.get("a")
    assert state.inflight == 0


async def test_access_log_is_json_and_sampled(backends: Backends, start_proxy, client, tmp_path) -> None:
    import json

    urls = {"a": await backends.start("a")}
    full, sampled = tmp_path / "full.log", tmp_path / "sampled.log"
    proxy = await start_proxy(proxy_config(urls, access_log={"enabled": True, "path": str(full)}))
    quiet = await start_proxy(proxy_config(urls, access_log={"enabled": True, "path": str(sampled),
                                                             "sample_rate": 0.1}))
    for _ in range(200):
        for p in (proxy, quiet):
            async with client.get(p.url + "/echo?secret=1") as resp:
                await resp.read()
    # A request refused before the handler (malformed) is logged too.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"GARBAGE\r\n\r\n")
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    lines = [json.loads(line) for line in full.read_text().splitlines()]
    assert len(lines) == 201
    fields = {"ts", "client", "method", "path", "status", "duration_ms", "backend", "request_id",
              "cluster", "bytes_out"}
    assert fields <= set(lines[0])
    assert lines[0]["backend"] == "a" and lines[0]["status"] == 200 and lines[0]["path"] == "/echo"
    assert lines[0]["cluster"] == "default" and lines[0]["bytes_out"] > 0
    assert lines[-1]["status"] == 400
    assert 5 <= len(sampled.read_text().splitlines()) <= 40  # 10% of 200, binomial 4 sigma


async def test_retry_budget_limits_retries(backends: Backends, start_proxy, client) -> None:
    urls = {"a": await backends.start("a"), "dead": "http://127.0.0.1:1"}
    no_budget = {"attempts": 3, "budget": {"percent": 0, "min_concurrent": 0}}
    # Passive detection would eject the dead backend after two failures; keep it in.
    health = {"active": {"enabled": False}, "consecutive": {"enabled": False},
              "success_rate": {"enabled": False}}
    proxy = await start_proxy(proxy_config(urls, retries=no_budget, health=health))
    statuses = []
    for _ in range(10):
        async with client.get(proxy.url + "/echo") as resp:
            statuses.append(resp.status)
    assert statuses.count(502) == 5  # every try on the dead backend fails: no budget to retry
    text = await (await client.get(proxy.admin_url + "/metrics")).text()
    assert 'foretell_retries_budget_exhausted_total{cluster="default"}' in text


async def test_a_reload_loads_the_anomaly_model_once_and_off_the_event_loop(
        backends: Backends, start_proxy, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few-MB forest takes a second to build: validating it on the loop and again in the
    new health checker stalled every request twice per SIGHUP."""
    import threading

    import numpy as np

    from health.anomaly import FEATURE_NAMES, AnomalyModel
    from tests.support import write_config
    from train.anomaly import fit_and_export

    model = tmp_path / "anomaly.onnx"
    rows = np.random.default_rng(0).normal(size=(400, len(FEATURE_NAMES)))
    fit_and_export(rows, model, n_estimators=10, seed=0)
    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    threads: list[str] = []
    real_init = AnomalyModel.__init__

    def recording_init(self: AnomalyModel, path: Path) -> None:
        threads.append(threading.current_thread().name)
        real_init(self, path)

    monkeypatch.setattr(AnomalyModel, "__init__", recording_init)
    cfg = yaml.safe_load(proxy.worker.config_path.read_text())
    cfg["health"] = {"active": {"enabled": False}, "anomaly": {"model_path": str(model)}}
    write_config(proxy.worker.config_path, cfg)
    assert await proxy.worker.reload()
    assert proxy.worker.proxy.runtime.clusters["default"].checker.anomaly.model is not None
    assert len(threads) == 1 and threads[0] != threading.main_thread().name


async def test_reload_with_missing_anomaly_model_keeps_serving(
        backends: Backends, start_proxy, client, tmp_path) -> None:
    from tests.support import write_config

    urls = {"a": await backends.start("a")}
    proxy = await start_proxy(proxy_config(urls))
    cluster = proxy.worker.proxy.runtime.clusters["default"].cluster
    listeners_before = len(cluster._outcome_listeners)
    # Valid structure, but the second cluster's anomaly model does not exist: rejected, named.
    bad = proxy_config({})
    del bad["backends"], bad["policy"], bad["health"]
    bad["listen"] = {"host": "127.0.0.1", "port": 0}
    bad["clusters"] = {
        "default": {"backends": [{"id": "a", "url": urls["a"]}], "policy": "least_request"},
        "other": {"backends": [{"id": "a", "url": urls["a"]}],
                  "health": {"anomaly": {"model_path": str(tmp_path / "missing.onnx")}}}}
    bad["routes"] = [{"cluster": "default"}]
    write_config(proxy.worker.config_path, bad)
    assert not await proxy.worker.reload()
    assert proxy.worker.proxy.runtime.clusters["default"].policy_name == "round_robin"
    assert len(cluster._outcome_listeners) == listeners_before
    async with client.get(proxy.url + "/echo") as resp:
        assert resp.status == 200
