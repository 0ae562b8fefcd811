"""The upstream client (proxy/upstream.py) against hand-written backends: connection
reuse, a kept-alive connection the backend has closed, bodies delimited by the
end of the connection, interim responses, HEAD, oversized and stalled answers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from proxy.upstream import UpstreamResponse
from tests.support import proxy_config, raw_backend

Respond = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Counting:
    """Wraps a raw handler and counts the connections the proxy opened."""

    def __init__(self, respond: Respond) -> None:
        self.connections = 0
        self._respond = respond

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._respond(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(respond: Respond) -> AsyncIterator[tuple[Counting, str]]:
    """A raw backend on loopback for the duration of the block: (its counter, its url)."""
    backend = Counting(respond)
    server, url = await raw_backend(backend)
    try:
        yield backend, url
    finally:
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def answering(reply: Callable[[bytes], bytes]) -> Respond:
    """A raw handler that answers every request on its connection with reply(its head)."""
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(reply(await _read_request(reader)))
            await writer.drain()

    return respond


async def test_keepalive_connections_are_reused(start_proxy, client) -> None:
    def echo_path(head: bytes) -> bytes:
        body = head.split(b" ")[1]
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)

    async with serving(answering(echo_path)) as (backend, url):
        proxy = await start_proxy(proxy_config({"a": url}))
        for i in range(20):
            async with client.get(f"{proxy.url}/n/{i}") as resp:
                assert resp.status == 200
                assert await resp.read() == f"/n/{i}".encode()
        assert backend.connections == 1


@pytest.mark.parametrize("close", [False, True], ids=["kept-alive", "closed"])
async def test_a_finished_response_is_freed_without_the_cyclic_gc(start_proxy, client,
                                                                  close: bool) -> None:
    """The parser calls back into its response (a reference cycle); finishing breaks it,
    so each response is freed by reference counting and the cyclic GC has no per-request
    garbage to find (~13 objects per request before). Both ends: the connection pooled
    (release) or closed (close)."""
    answer = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n%b\r\nok"
              % (b"Connection: close\r\n" if close else b""))

    async def answer_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _read_request(reader)
            writer.write(answer)
            await writer.drain()
            if close:
                return

    async with serving(answer_all) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}))
        gc.collect()
        gc.disable()
        try:
            for i in range(30):
                async with client.get(f"{proxy.url}/n/{i}") as resp:
                    assert await resp.read() == b"ok"
            await asyncio.sleep(0.05)  # the last handler finishes after the client has read
            left = sum(1 for o in gc.get_objects() if isinstance(o, UpstreamResponse))
        finally:
            gc.enable()
    assert left == 0


async def test_a_kept_alive_connection_closed_by_the_backend_is_replaced(start_proxy, client) -> None:
    """The backend reads the second request on a connection and closes it unanswered
    (its idle timeout racing the proxy's reuse): a GET goes again on a fresh connection,
    invisibly; a POST with a body is not replayed."""

    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request: dropped

    async with serving(one_per_connection) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}, retries={"attempts": 1}))
        for _ in range(5):
            async with client.get(proxy.url + "/x") as resp:
                assert resp.status == 200
                assert await resp.read() == b"ok"
        state = proxy.worker.proxy.runtime.clusters["default"].cluster.get("a")
        assert state.errors == 0
        # The last GET's connection is pooled; a POST on it is dropped and not replayed.
        async with client.post(proxy.url + "/x", data=b"payload") as resp:
            assert resp.status == 502
            assert resp.headers["x-foretell-error"] == "upstream_reset"


async def test_interim_response_is_skipped_and_eof_ends_the_body(start_proxy, client) -> None:
    async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        # No Content-Length, not chunked: the body runs to the end of the connection.
        writer.write(b"HTTP/1.1 200 OK\r\nX-Final: yes\r\n\r\nhello ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"world")
        await writer.drain()

    async with serving(early_hints) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}))
        async with client.get(proxy.url + "/x") as resp:
            assert resp.status == 200
            assert resp.headers["X-Final"] == "yes"
            assert "Link" not in resp.headers
            assert await resp.read() == b"hello world"


async def test_head_responses_leave_the_connection_usable(start_proxy, client) -> None:
    """A HEAD answer declares a length (or none) but carries no body; the connection is
    reused after one without a length, not after one with (see the next test)."""

    def head_then_get(head: bytes) -> bytes:
        if head.startswith(b"HEAD /length"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
        if head.startswith(b"HEAD "):
            return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

    async with serving(answering(head_then_get)) as (backend, url):
        proxy = await start_proxy(proxy_config({"a": url}))
        for _ in range(3):
            async with client.head(proxy.url + "/length") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == "100"
            async with client.head(proxy.url + "/none") as resp:
                assert resp.status == 200
            async with client.get(proxy.url + "/x") as resp:
                assert await resp.read() == b"hello"
        # A HEAD answered with a length is not followed on its connection (the test
        # below says why); the others reuse one: a connection per round.
        assert backend.connections == 4


@pytest.mark.parametrize("first", ["HEAD", "GET"])  # GET: a 304
async def test_a_late_body_after_head_never_answers_another_request(start_proxy, client,
                                                                    first: str) -> None:
    """The backend answers HEAD (or a conditional GET with 304) with a head that
    announces 41 bytes, then sends them a moment later, shaped as a response: the next
    request must get its own answer."""
    async def late_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await _read_request(reader)
            if head.startswith(b"HEAD ") or b"/h " in head:
                status = b"200 OK" if head.startswith(b"HEAD ") else b"304 Not Modified"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 41\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine")
            await writer.drain()

    async with serving(late_body) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}))
        async with client.request(first, proxy.url + "/h") as resp:
            assert resp.status == (200 if first == "HEAD" else 304)
        async with client.get(proxy.url + "/x") as resp:
            assert await resp.read() == b"mine"


async def test_a_status_above_599_is_a_502(start_proxy, client) -> None:
    async def odd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with serving(odd) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}, retries={"attempts": 1}))
        async with client.get(proxy.url + "/x") as resp:
            assert resp.status == 502
            assert resp.headers["x-foretell-error"] == "upstream_reset"


async def test_oversized_response_head_is_a_502(start_proxy, client) -> None:
    async def huge_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"b" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with serving(huge_head) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}, retries={"attempts": 1}))
        async with client.get(proxy.url + "/x") as resp:
            assert resp.status == 502
            assert resp.headers["x-foretell-error"] == "upstream_reset"


async def test_a_body_that_stalls_is_cut_after_the_read_timeout(start_proxy, client) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        await asyncio.sleep(5)

    async with serving(stall) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}, retries={"attempts": 1},
                                               timeouts={"per_try_s": 0.5, "total_s": 2.0}))
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(proxy.url + "/x") as resp:
                assert resp.status == 200
                await resp.read()
        assert time.monotonic() - started < 2.0


async def _raw_exchange(port: int, request: bytes, timeout_s: float = 3.0) -> bytes:
    """Everything the proxy sends back on one client connection (Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        async with asyncio.timeout(timeout_s):
            return await reader.read()
    except ConnectionError:
        return b""
    finally:
        writer.close()


_GET_CLOSE = b"GET /x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"


async def test_a_second_response_slipped_after_the_first_is_ignored(start_proxy) -> None:
    async def two_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                     b"HTTP/1.1 302 Found\r\nLocation: https://evil.example/\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serving(two_answers) as (backend, url):
        proxy = await start_proxy(proxy_config({"a": url}))
        for _ in range(2):
            raw = await _raw_exchange(proxy.worker.listen_port, _GET_CLOSE)
            assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw
            assert b"evil" not in raw and raw.count(b"Content-Length") == 1, raw
            assert raw.endswith(b"\r\n\r\nok")
        assert backend.connections == 2  # that connection was not reused


async def test_content_length_with_trailing_blank_frames_the_body(start_proxy) -> None:
    """The backend declares 100000 bytes (with a trailing blank, which llhttp allows),
    sends 10 and closes: the client's connection must be cut, not reused for the next
    response (which would then land inside the first one's declared body)."""

    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await _read_request(reader)
        if b"/first" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000 \r\n\r\n" + b"A" * 10)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        await writer.drain()

    async with serving(short) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}, retries={"attempts": 1}))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
        writer.write(b"GET /first HTTP/1.1\r\nHost: p\r\n\r\n")
        await asyncio.sleep(0.3)
        data = b""
        try:
            writer.write(b"GET /second HTTP/1.1\r\nHost: p\r\n\r\n")  # same keep-alive connection
            async with asyncio.timeout(1.0):
                while chunk := await reader.read(65536):
                    data += chunk
        except (TimeoutError, ConnectionError):
            pass
        writer.transport.abort()
        assert data.startswith(b"HTTP/1.1 200")
        assert b"second" not in data, data


async def test_a_reset_does_not_end_a_body_delimited_by_close(start_proxy) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial-")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN: the backend crashed mid-body

    async with serving(reset) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}, retries={"attempts": 1}))
        raw = await _raw_exchange(proxy.worker.listen_port, _GET_CLOSE)
        assert raw.startswith(b"HTTP/1.1 200")
        assert not raw.endswith(b"0\r\n\r\n"), raw  # no clean chunked end: the client sees the cut


async def test_a_request_that_kills_its_connection_is_replayed_at_most_once(start_proxy, client) -> None:
    seen = {"deadly": 0}

    async def dies_on_deadly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await _read_request(reader)
            if b"/deadly" in head:
                seen["deadly"] += 1
                writer.transport.abort()
                return
            await asyncio.sleep(0.1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with serving(dies_on_deadly) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}, retries={"attempts": 1}))

        async def warm() -> None:
            async with client.get(proxy.url + "/warm") as resp:
                await resp.read()

        await asyncio.gather(*(warm() for _ in range(6)))  # several pooled connections
        async with client.get(proxy.url + "/deadly") as resp:
            assert resp.status == 502
        assert seen["deadly"] == 2


async def test_an_upload_longer_than_per_try_is_not_timed_out(backends, start_proxy) -> None:
    """per_try_s bounds the wait for the answer once the request is sent, not the upload."""
    url = await backends.start("a")
    proxy = await start_proxy(proxy_config({"a": url}, retries={"attempts": 1},
                                           timeouts={"per_try_s": 0.5, "total_s": 10.0}))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.worker.listen_port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: p\r\nConnection: close\r\nContent-Length: 10000\r\n\r\n")
    for _ in range(10):  # 1.5 s in all, never idle for long
        writer.write(b"q" * 1000)
        await writer.drain()
        await asyncio.sleep(0.15)
    async with asyncio.timeout(5):
        raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert b'"received": 10000' in raw


async def test_a_raising_policy_hook_does_not_leak_the_connection(start_proxy, client) -> None:
    open_now = {"n": 0}

    async def count_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_now["n"] += 1
        try:
            while True:
                await _read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        finally:
            open_now["n"] -= 1

    async with serving(count_open) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}, retries={"attempts": 1},
                                               policy={"kind": "tests.support.ObserveRaises"}))
        for _ in range(5):
            async with client.get(proxy.url + "/x") as resp:
                assert resp.status == 500  # the bug surfaces as aiohttp's 500, nothing hangs
        await asyncio.sleep(0.2)
        upstream = proxy.worker.proxy.runtime.clusters["default"].upstream
        assert open_now["n"] == upstream.idle_connections() == 0


@pytest.mark.parametrize("framing", [b"Content-Length: 5\r\n\r\nhello",
                                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"])
async def test_a_response_is_relayed_without_headers_the_backend_did_not_send(
        start_proxy, framing: bytes) -> None:
    """No Content-Type made up for an untyped body (clients would stop sniffing it), no
    Server header naming the proxy's stack; a backend's own are kept."""
    def bare(head: bytes) -> bytes:
        typed = b"Content-Type: text/html\r\nServer: origin\r\n" if b"/typed" in head else b""
        return b"HTTP/1.1 200 OK\r\n" + typed + framing

    async with serving(answering(bare)) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}))
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/bare") as resp:
                assert await resp.read() == b"hello"
                assert "Content-Type" not in resp.headers and "Server" not in resp.headers
            async with session.get(proxy.url + "/typed") as resp:
                assert await resp.read() == b"hello"
                assert resp.headers["Content-Type"] == "text/html"
                assert resp.headers["Server"] == "origin"


@pytest.mark.parametrize(("method", "replayed"), [("GET", True), ("DELETE", False)])
async def test_a_small_body_cut_short_is_a_failed_try(start_proxy, client, method: str,
                                                      replayed: bool) -> None:
    """The head promises 100 bytes, 10 come, then the connection closes: the try counts
    as a reset against the backend (it counted as a 200). A GET is replayed on the other
    backend (the client has seen nothing); a DELETE is not: the backend answered, so it
    may have acted on it (Envoy retries a reset only when nothing came back)."""
    hits = {"cut": 0, "whole": 0}

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        hits["cut"] += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()

    def whole(head: bytes) -> bytes:
        hits["whole"] += 1
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwhole"

    async with serving(cut) as (_, cut_url), serving(answering(whole)) as (_, whole_url):
        proxy = await start_proxy(proxy_config({"cut": cut_url, "whole": whole_url},
                                               policy={"kind": "tests.support.FirstReady"},
                                               retries={"attempts": 2}))
        async with client.request(method, proxy.url + "/x") as resp:
            body = await resp.read()
        if replayed:
            assert (resp.status, body) == (200, b"whole")
        else:
            assert resp.status == 502 and b"mid-body" in body
            assert resp.headers["x-foretell-error"] == "upstream_reset"
        assert hits == {"cut": 1, "whole": 1 if replayed else 0}
        assert proxy.worker.proxy.runtime.clusters["default"].cluster.get("cut").errors == 1


async def test_an_absolute_form_target_is_forwarded_byte_for_byte(start_proxy) -> None:
    """Its path and query are not re-encoded, a non-UTF-8 header passes, and the target's
    authority is the one Host sent."""
    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with serving(record) as (_, url):
        proxy = await start_proxy(proxy_config({"a": url}))
        raw = await _raw_exchange(
            proxy.worker.listen_port,
            b"GET http://origin.example/a/%2e%2e/b?q=%2B%3d&r=%zz HTTP/1.1\r\nHost: other.example\r\n"
            b"X-Legacy: caf\xe9\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    (head,) = heads
    assert head.startswith(b"GET /a/%2e%2e/b?q=%2B%3d&r=%zz HTTP/1.1\r\n"), head
    lines = head.lower().split(b"\r\n")
    assert [ln for ln in lines if ln.startswith(b"host:")] == [b"host: origin.example"]
    assert b"x-legacy: caf\xe9" in lines
