"""The client-facing HTTP connection: aiohttp's low-level server, hardened.

Two things aiohttp's RequestHandler does not do by itself:
- answer oversized header lines / too many headers with 431 (it says 400);
- close a connection whose request headers do not arrive in time
  (slowloris): the first request's within client_header_s of the connection,
  a later one's within client_header_s of its first byte (as HAProxy's
  `timeout http-request`). aiohttp's keep-alive timer (client_idle_s) alone
  would let a kept-alive connection drip a head for that long (75 s); it
  still bounds a head whose first bytes came while the previous request ran.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy import errors
from proxy.access_log import AccessLog


class ProxyRequestHandler(RequestHandler):
    def __init__(self, *args: Any, header_timeout_s: float, json_log: AccessLog | None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._json_log = json_log
        # aiohttp then times each request and calls log_access once it is sent.
        self._logging_enabled = json_log is not None

    def log_access(self, request: BaseRequest, response: web.StreamResponse, time: float | None) -> None:
        if self._json_log is not None and time is not None:
            self._json_log.record(request, response, self._loop.time() - time)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._header_timer = self._loop.call_later(self._header_timeout_s, self._headers_overdue)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:  # a head arrived whole (the usual case: no timer)
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif self._header_timer is None and self._waiter is not None:
            # Bytes while the connection waits for its next request (aiohttp's start()
            # sets _waiter only then: not while a request runs, nor while it drains the
            # rest of a body after an early answer): the start of a head.
            self._header_timer = self._loop.call_later(self._header_timeout_s,
                                                       self._headers_overdue)

    def _headers_overdue(self) -> None:
        """No head completed since the timer started: a completed one cancels it."""
        self._header_timer = None
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ConnectionResetError) and request.writer.output_size > 0:
            # The proxy cut a response it could not finish (already logged):
            # no 500 to send and no traceback to print, just close.
            raise ConnectionError("response cut off") from exc
        if _headers_too_large(exc):
            reason = errors.HEADERS_TOO_LARGE
        elif status == 400:
            reason = errors.BAD_REQUEST
        else:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        return errors.error_response(reason, str(exc or message or "")[:200], close=True)


def _headers_too_large(exc: BaseException | None) -> bool:
    if isinstance(exc, LineTooLong):
        return True
    return isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)


class ProxyHttpServer(web.Server):
    """web.Server whose connections use ProxyRequestHandler."""

    def __init__(self, handler: Any, *, header_timeout_s: float, json_log: AccessLog | None,
                 **kwargs: Any) -> None:
        # aiohttp's own access logger stays off: ours is called from log_access.
        super().__init__(handler, access_log=None, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._json_log = json_log

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, header_timeout_s=self._header_timeout_s,
                                   json_log=self._json_log, **self._kwargs)
