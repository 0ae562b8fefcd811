"""The upstream HTTP/1.1 client: pooled keep-alive connections to backends.

aiohttp's ClientSession was a third of the proxy's CPU per request: it builds
a URL, a request object, cookie and trace hooks, timers and a response
object with a stream reader for every call. A proxy needs far less: write
the request head it already has, parse the answer with llhttp (httptools,
the parser uvicorn uses) and hand the body on as it arrives. WebSocket
upgrades still go through an aiohttp session (`websocket_session`).

One `Upstream` per cluster; connections are keyed by origin and reused
most-recently-idle first, so the spare ones age out.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

# Idle upstream connections older than this are closed: below typical backend
# keep-alive timeouts, so the proxy closes first and rarely writes to a
# connection the backend is closing.
UPSTREAM_KEEPALIVE_S = 30.0
# A response body buffered beyond this pauses reading from the backend until
# the client has taken it (bounded memory for large downloads).
READ_HIGH_WATER_BYTES = 256 * 1024
# Response head larger than this is refused (aiohttp's client allows 8 KB a line).
MAX_RESPONSE_HEAD_BYTES = 64 * 1024

# Transparently resent (once) on a fresh connection when a reused one turns out closed.
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# A request that cannot be resent only takes a connection idle for less than this:
# backends close idle connections after as little as 2 s (gunicorn), 5 s (uvicorn,
# Node), and one closing as the request arrives would cost the client a 502.
UNREPLAYABLE_MAX_IDLE_S = 1.0


class UpstreamError(Exception):
    """A try failed on the way to or from the backend."""


class ConnectFailed(UpstreamError):
    """No connection (refused, unreachable, TLS handshake, connect timeout)."""


class UpstreamBroken(UpstreamError):
    """The connection closed or the backend sent something that is not HTTP/1.1."""


class IdleTimeout(UpstreamError, TimeoutError):
    """No progress (response bytes in, or request bytes taken) within the idle timeout."""


def client_ssl_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Origin(NamedTuple):
    host: str
    port: int
    tls: bool
    host_header: str  # sent when the client's request had no Host


def parse_origin(url: str) -> Origin:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"backend url {url!r}: expected http(s)://host[:port]")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    default_port = 443 if tls else 80
    return Origin(host, port, tls, shown if port == default_port else f"{shown}:{port}")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one response at a time."""

    __slots__ = ("_drain_waiter", "_paused", "aborted", "closed", "eof", "idle_since", "response",
                 "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.aborted = False  # closed by us, so an end of stream is not the end of a body
        # The backend ended the stream: a FIN, or over TLS its close_notify (a TLS
        # connection cut without one never gets here, so it cannot end a body).
        self.eof = False
        self.idle_since = 0.0
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        self.eof = True
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response.connection_lost(exc is None and self.eof and not self.aborted)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamBroken(f"connection lost while sending: {exc!r}"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self, idle_s: float) -> None:
        if self.closed:
            raise UpstreamBroken("connection closed while sending")
        if not self._paused:
            return
        loop = asyncio.get_running_loop()
        self._drain_waiter = waiter = loop.create_future()
        timer = loop.call_later(idle_s, _stalled, waiter, idle_s)
        try:
            await waiter
        finally:
            timer.cancel()
            self._drain_waiter = None

    def abort(self) -> None:
        self.closed = self.aborted = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """A backend's response: status and headers at once, the body as it arrives.

    Also the llhttp callback target for its own parse. Finish with `release()`
    (the connection goes back to the pool when the exchange was complete) or
    `close()`.
    """

    __slots__ = ("_body", "_body_bytes", "_conn", "_ended", "_eof_body", "_error", "_finished",
                 "_head_bytes", "_head_waiter", "_interim", "_loop", "_no_body", "_parser", "_raw_headers",
                 "_read_timeout_s", "_reading_paused", "_upstream", "_waiter", "_writer", "complete",
                 "content_length", "got_bytes", "headers", "key", "reason", "status", "will_close")

    def __init__(self, upstream: Upstream, key: Origin, conn: _Connection, method: str,
                 read_timeout_s: float) -> None:
        self._upstream = upstream
        self.key = key
        self._conn = conn
        self._loop = upstream.loop
        self._read_timeout_s = read_timeout_s
        self._parser = httptools.HttpResponseParser(self)
        self._no_body = method == "HEAD"
        self._raw_headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._interim = False
        self._ended = False  # the final message is over (or, for HEAD, its head)
        self._eof_body = False
        self._finished = False  # released or closed
        self._head_waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._body: collections.deque[bytes] = collections.deque()
        self._body_bytes = 0
        self._reading_paused = False
        self._error: BaseException | None = None
        self._writer: asyncio.Task[None] | None = None
        self.got_bytes = False
        self.complete = False
        self.will_close = False
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _EMPTY
        self.content_length: int | None = None

    # -- llhttp callbacks -------------------------------------------------------
    # After the final message has ended (`_ended`), anything more on the
    # connection is a message nobody asked for: ignored, and the connection is
    # not reused (a backend must not be able to slip a second response in).
    def on_message_begin(self) -> None:
        if self._ended:
            self.will_close = True

    def on_status(self, reason: bytes) -> None:
        if not self._ended:
            self.reason = reason.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._ended:
            return
        # Counts trailers too, so the list stays bounded (trailers are not forwarded).
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise UpstreamBroken(f"response head over {MAX_RESPONSE_HEAD_BYTES} bytes")
        self._raw_headers.append((name.decode("utf-8", "surrogateescape"),
                                  value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        if self._ended:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # Interim (100 Continue, 103 Early Hints): not forwarded; the real one follows.
            self._interim = True
            self._raw_headers = []
            self._head_bytes = 0
            return
        if status > 599:  # RFC 9110 §15: three digits, 1xx to 5xx; passed on it breaks clients
            raise UpstreamBroken(f"status {status} out of range")
        self.status = status
        headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        self._raw_headers = []
        self.headers = headers
        length = headers.get("Content-Length")
        if length is not None:  # llhttp checked the digits; it passes trailing blanks on
            self.content_length = int(length.strip(" \t"))
        coding = headers.get("Transfer-Encoding")
        if coding is not None and coding.strip(" \t").lower() != "chunked":
            # Codings other than chunked would reach the client undeclared (the
            # header is hop-by-hop): refuse rather than corrupt the body.
            raise UpstreamBroken(f"unsupported transfer coding {coding!r}")
        if self._no_body:
            # llhttp does not know the request was HEAD: decide reuse from the headers.
            # A head that announces a body is not reused either: a backend that sends the
            # body anyway, a moment after the head (a handler streaming a GET's answer to
            # HEAD), would have it read as the next request's response, another client's.
            # The cost: a new connection after such a HEAD.
            self.will_close = (_asks_close(headers, self._parser.get_http_version())
                               or bool(self.content_length) or coding is not None)
            self.content_length = 0
            self.complete = self._ended = True
        else:
            self.will_close = not self._parser.should_keep_alive()
            self.complete = status in (204, 304)
            if self.complete and (self.content_length or coding is not None):
                # A 204 or 304 announcing a body: one it must not send may still follow
                # (see HEAD).
                self.will_close = True
            # RFC 9112 §6.3: no length and not chunked means the body runs to the end of the connection.
            self._eof_body = not self.complete and self.content_length is None and coding is None
        if not self._head_waiter.done():
            self._head_waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._ended:  # a body after HEAD: do not reuse
            self.will_close = True
            return
        self._body.append(body)
        self._body_bytes += len(body)
        if self._body_bytes > READ_HIGH_WATER_BYTES and not self._reading_paused:
            self._reading_paused = True
            transport = self._conn.transport
            if transport is not None:
                transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._ended:
            return
        if self._interim:
            self._interim = False
            return
        self.complete = self._ended = True
        self._wake()

    # -- connection events ------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("backend switched protocols on a plain request"))
            self._conn.abort()
        except (httptools.HttpParserError, UpstreamBroken, ValueError) as exc:
            self._fail(exc if isinstance(exc, UpstreamBroken) else UpstreamBroken(f"bad response: {exc}"))
            self._conn.abort()

    def connection_lost(self, clean_eof: bool) -> None:
        if self.complete:
            return
        if self._eof_body and clean_eof:
            # The backend ended the stream: that is the end of this body. A reset,
            # our own abort or a TLS cut without close_notify is not.
            self.complete = self._ended = True
            self._wake()
            return
        self._fail(UpstreamBroken("backend closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if not self._head_waiter.done():
            self._head_waiter.set_exception(exc)
            self._head_waiter.exception()  # retrieved: nobody may be waiting any more
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading ----------------------------------------------------------------
    async def _wait_data(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = waiter = self._loop.create_future()
        timer = self._loop.call_later(self._read_timeout_s, _time_out, waiter, self._read_timeout_s)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._error is not None and not self._body:
            raise self._error

    def _take(self) -> bytes:
        body = self._body
        chunk = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self._body_bytes = 0
        if self._reading_paused:
            self._reading_paused = False
            transport = self._conn.transport
            if transport is not None and not self._conn.closed:
                transport.resume_reading()
        return chunk

    async def read(self) -> bytes:
        """The whole body (for small responses)."""
        while not self.complete:
            await self._wait_data()
        return self._take() if self._body else b""

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; at most READ_HIGH_WATER_BYTES are held."""
        while True:
            if self._body:
                yield self._take()
            elif self.complete:
                return
            else:
                await self._wait_data()

    # -- finishing --------------------------------------------------------------
    def release(self) -> None:
        """Done with the response: pool the connection when the exchange ended cleanly."""
        if self._finished:
            return
        conn = self._conn
        writer = self._writer
        if (not self.complete or self.will_close or self._error is not None or conn.closed
                or (writer is not None and not (writer.done() and not writer.cancelled()
                                                and writer.exception() is None))):
            self.close()
            return
        self._upstream._pool(self.key, self._finish())

    def _finish(self) -> _Connection:
        """Mark the response done and detach it from its connection (returned)."""
        self._finished = True
        # The parser calls back into this response (bound methods): a reference cycle
        # that only the cyclic GC would free, ~13 objects per request. Nothing feeds it
        # once finished (the connection forgets its response).
        del self._parser
        conn = self._conn
        conn.response = None
        return conn

    def close(self) -> None:
        """Done with the response, connection closed. Safe to call more than once."""
        if self._finished:
            return
        conn = self._finish()
        writer = self._writer
        if writer is not None:
            if not writer.done():
                writer.cancel()
            elif not writer.cancelled():
                writer.exception()  # seen: the client's body error is handled by the caller
        conn.abort()


def _time_out(waiter: asyncio.Future[None], timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(IdleTimeout(f"no response bytes for {timeout_s:g} s"))


def _stalled(waiter: asyncio.Future[None], timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(IdleTimeout(f"backend took no request bytes for {timeout_s:g} s"))


def _asks_close(headers: CIMultiDictProxy[str], version: str) -> bool:
    tokens = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    return "close" in tokens or (version == "1.0" and "keep-alive" not in tokens)


_EMPTY: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class Upstream:
    """Connection pools to one cluster's backends, with its TLS settings."""

    def __init__(self, *, verify: bool = True, ca_file: str | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._verify = verify
        self._ca_file = ca_file
        self._ssl: ssl.SSLContext | None = None
        self._origins: dict[str, Origin] = {}
        self._idle: dict[Origin, list[_Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._ws_session: aiohttp.ClientSession | None = None
        self.closed = False

    def origin(self, url: str) -> Origin:
        key = self._origins.get(url)
        if key is None:
            key = self._origins[url] = parse_origin(url)
        return key

    async def request(self, url: str, method: str, target: str, headers: list[tuple[str, str]],
                      body: AsyncIterator[bytes] | None, *, connect_timeout_s: float,
                      read_timeout_s: float, body_sent: Callable[[], object] | None = None
                      ) -> UpstreamResponse:
        """Send a request to the backend at `url` and return once its response head is in.

        `headers` are sent as given (plus Host when missing, and chunked
        framing for a body without Content-Length). `body_sent` is called when
        the whole body is written (the caller's wait for the answer starts
        then). Raises ConnectFailed, UpstreamBroken or IdleTimeout; the caller
        bounds the wait for the head.
        """
        if self.closed:
            raise UpstreamBroken("upstream pool closed (configuration reloaded)")
        key = self.origin(url)
        chunked = False
        if body is not None:
            chunked = not any(name.lower() == "content-length" for name, _ in headers)
        head = _request_head(method, target, headers, key.host_header, chunked)
        replay_safe = body is None and method in _REPLAYABLE
        max_idle_s = UPSTREAM_KEEPALIVE_S if replay_safe else UNREPLAYABLE_MAX_IDLE_S
        while True:
            conn = self._idle_connection(key, max_idle_s)
            fresh = conn is None
            if conn is None:
                conn = await self._connect(key, connect_timeout_s)
            response = UpstreamResponse(self, key, conn, method, read_timeout_s)
            conn.response = response
            assert conn.transport is not None
            conn.transport.write(head)
            if body is not None:
                writer = self.loop.create_task(_send_body(conn, body, chunked, read_timeout_s))
                if body_sent is not None:
                    writer.add_done_callback(
                        lambda task: None if task.cancelled() or task.exception() else body_sent())
                response._writer = writer
            try:
                await response._head_waiter
            except UpstreamBroken:
                response.close()
                # A kept-alive connection the backend had just closed: nothing was
                # processed, so a replay-safe request goes once more, on a fresh one.
                if fresh or response.got_bytes or not replay_safe:
                    raise
                replay_safe = False
                continue
            except BaseException:
                response.close()
                raise
            return response

    def _idle_connection(self, key: Origin, max_idle_s: float) -> _Connection | None:
        idle = self._idle.get(key)
        now = self.loop.time()
        while idle:
            conn = idle[-1]  # the most recently used
            age_s = now - conn.idle_since
            if conn.closed or age_s >= UPSTREAM_KEEPALIVE_S:
                idle.pop()
                conn.abort()
            elif age_s >= max_idle_s:
                return None
            else:
                return idle.pop()
        return None

    async def _connect(self, key: Origin, timeout_s: float) -> _Connection:
        context = None
        if key.tls:
            if self._ssl is None:
                self._ssl = client_ssl_context(self._verify, self._ca_file)
            context = self._ssl
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await self.loop.create_connection(
                    _Connection, key.host, key.port, ssl=context,
                    server_hostname=key.host if context is not None else None)
        except TimeoutError as exc:
            raise ConnectFailed(f"connect to {key.host}:{key.port} timed out after {timeout_s:g} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"connect to {key.host}:{key.port}: {exc}") from exc
        if self.closed:
            conn.abort()
            raise UpstreamBroken("upstream pool closed (configuration reloaded)")
        return conn

    def _pool(self, key: Origin, conn: _Connection) -> None:
        if self.closed:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = []
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(UPSTREAM_KEEPALIVE_S / 2, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle too long (the most recently used are at the end)."""
        self._sweeper = None
        oldest_ok = self.loop.time() - UPSTREAM_KEEPALIVE_S
        remaining = 0
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and c.idle_since >= oldest_ok]
            for conn in idle:
                if conn.closed or conn.idle_since < oldest_ok:
                    conn.abort()
            if keep:
                self._idle[key] = keep
                remaining += len(keep)
            else:
                del self._idle[key]
        if remaining and not self.closed:
            self._sweeper = self.loop.call_later(UPSTREAM_KEEPALIVE_S / 2, self._sweep)

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def websocket_session(self) -> aiohttp.ClientSession:
        """An aiohttp session for WebSocket upgrades (rare; made on first use)."""
        if self._ws_session is None:
            connector = aiohttp.TCPConnector(limit=0, ssl=client_ssl_context(self._verify, self._ca_file))
            self._ws_session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                     cookie_jar=aiohttp.DummyCookieJar())
        return self._ws_session

    async def close(self) -> None:
        """Close idle connections now; busy ones close when their response is released."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
        if self._ws_session is not None:
            await self._ws_session.close()


def _request_head(method: str, target: str, headers: list[tuple[str, str]], host_header: str,
                  chunked: bool) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    has_host = False
    for name, value in headers:
        if not has_host and name.lower() == "host":
            has_host = True
        lines.append(f"{name}: {value}")
    if not has_host:
        lines.append(f"Host: {host_header}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


async def _send_body(conn: _Connection, body: AsyncIterator[bytes], chunked: bool, idle_s: float) -> None:
    """Stream the request body; on any failure abort, so the backend sees it cut."""
    transport = conn.transport
    assert transport is not None
    try:
        async for chunk in body:
            if not chunk:
                continue  # an empty chunk would end a chunked body
            if conn.closed:
                raise UpstreamBroken("connection closed while sending the body")
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            await conn.drain(idle_s)
        if chunked and not conn.closed:
            transport.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        if conn.response is not None and isinstance(exc, UpstreamError):
            conn.response._fail(exc)  # the try fails with this reason, not "connection lost"
        conn.abort()
        raise
