"""The request path: route, pick, forward, retry, answer.

`Proxy.handle` is the aiohttp low-level handler. It never raises for an
upstream problem: every failure becomes a 4xx/5xx with an `x-foretell-error`
reason, and safe requests are retried on a different backend first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from itertools import chain
from typing import Any

import aiohttp
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.web_request import BaseRequest

from policies.base import RequestInfo
from proxy import errors, metrics
from proxy.access_log import CLUSTER_KEY, AccessLog
from proxy.headers import client_response_headers, upstream_request_headers
from proxy.load_report import parse_utilization
from proxy.request_checks import AUTHORITY_KEY, origin_form, refusal
from proxy.retry import IDEMPOTENT, SAFE, RetryPlan
from proxy.runtime import ClusterRuntime, Runtime
from proxy.state import ERROR_CONNECT, ERROR_RESET, ERROR_TIMEOUT, BackendState, Outcome
from proxy.upstream import ConnectFailed, UpstreamError, UpstreamResponse

log = logging.getLogger("foretell.proxy")

# Responses up to this size are read whole and sent in one write.
BUFFER_LIMIT_BYTES = 64 * 1024
_NONE: frozenset[int] = frozenset()

LOAD_HEADER = "endpoint-load-metrics"

_REASON_OF_KIND = {
    ERROR_CONNECT: errors.CONNECT_FAILURE,
    ERROR_RESET: errors.RESET,
    ERROR_TIMEOUT: errors.TIMEOUT,
}


class HeaderDeadline:
    """Cancel the current task when the response headers are late.

    The wait starts at once for a request without a body, and when the body
    has been sent for one with (like Envoy's route timeout, which starts
    when the request is complete): an upload is bounded by its idle
    timeouts, not by per_try_s. asyncio.timeout does the same with a context
    manager and a reschedulable state machine; on every request that cost a
    few percent of the proxy's CPU. One timer handle and a flag are enough.
    """

    __slots__ = ("_budget_s", "_done", "_fired", "_handle", "_loop", "_task", "_timeout_s")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float, budget_s: float, *,
                 start: bool = True) -> None:
        self._loop = loop
        self._task = asyncio.current_task(loop)
        self._timeout_s = timeout_s
        # What is left of total_s, counted from the start of the wait: an upload slower
        # than total_s is the client's time, not a backend timeout.
        self._budget_s = budget_s
        self._fired = False
        self._done = False
        self._handle: asyncio.TimerHandle | None = None
        if start:
            self.start()

    def start(self) -> None:
        if self._done or self._handle is not None:
            return
        self._handle = self._loop.call_later(min(self._timeout_s, self._budget_s), self._fire)

    def _fire(self) -> None:
        if self._done:
            return
        self._fired = True
        if self._task is not None:
            self._task.cancel()

    def expired(self) -> bool:
        """True when this deadline alone caused the cancellation (which is then absorbed)."""
        if not self._fired:
            return False
        # A cancellation from outside at the same time (client gone, shutdown) wins.
        return self._task is None or self._task.uncancel() == 0

    def disarm(self) -> None:
        self._done = True
        if self._handle is not None:
            self._handle.cancel()


class RelayedStreamResponse(web.StreamResponse):
    """A backend's response relayed with the headers it came with. aiohttp gives a body
    without Content-Type one (application/octet-stream: clients then stop sniffing it)
    and adds a Server header naming its own version; neither is the backend's."""

    async def _prepare_headers(self) -> None:
        headers = self._headers
        had_type = hdrs.CONTENT_TYPE in headers
        had_server = hdrs.SERVER in headers
        await super()._prepare_headers()
        if not had_type:
            headers.popall(hdrs.CONTENT_TYPE, None)
        if not had_server:
            headers.popall(hdrs.SERVER, None)


class RelayedResponse(RelayedStreamResponse, web.Response):
    """The same, for a body read whole."""


class BodyTooLarge(Exception):
    pass


class ClientBodyError(Exception):
    """The client's body broke (malformed chunking, stalled, connection lost)."""


class RequestBody:
    """The client's request body, streamed once, with a size limit and an idle timeout.

    `started` tells whether any byte may have gone upstream: until then the
    request can be replayed on another backend whatever its method.
    `too_large` and `client_error` say a failed try was the client's doing,
    not the backend's, so it must not count against the backend.
    """

    def __init__(self, content: aiohttp.StreamReader, limit_bytes: int | None, idle_s: float) -> None:
        self._content = content
        self._limit_bytes = limit_bytes
        self._idle_s = idle_s
        self.started = False
        self.sent_bytes = 0
        self.too_large = False
        self.client_error = False

    @property
    def failed(self) -> bool:
        return self.too_large or self.client_error

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        content = self._content
        while True:
            try:
                async with asyncio.timeout(self._idle_s):
                    chunk = await content.readany()
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                self.client_error = True
                raise ClientBodyError(f"request body: {exc!r}") from exc
            if not chunk:
                return
            self.sent_bytes += len(chunk)
            if self._limit_bytes is not None and self.sent_bytes > self._limit_bytes:
                self.too_large = True
                raise BodyTooLarge()
            yield chunk


class Proxy:
    """Holds the current runtime and answers requests with it."""

    def __init__(self, runtime: Runtime, *, telemetry: Any = None, forecaster: Any = None,
                 access_log: AccessLog | None = None) -> None:
        self.runtime = runtime
        self.telemetry = telemetry
        self.forecaster = forecaster
        self.access_log = access_log
        self.active_requests = 0
        self.active_retries = 0
        self.draining = False
        # aiohttp's tasks (one per connection) of the requests in progress, for `cut`.
        self._inflight: set[asyncio.Task[Any]] = set()
        self._cutting = False
        self._loop = asyncio.get_running_loop()
        self._loop_time: Callable[[], float] = self._loop.time

    # -- entry point ----------------------------------------------------------
    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        runtime = self.runtime
        runtime.active += 1
        self.active_requests += 1
        task = request.task  # the connection's (asyncio.current_task() costs 0.3 µs)
        self._inflight.add(task)
        cluster_name = "-"
        resp: web.StreamResponse | None = None
        original = request  # origin_form may swap in a copy; aiohttp logs this one
        try:
            if self.forecaster is not None:
                self.forecaster.on_request()
            limits = runtime.config.limits
            if _header_bytes(request) > limits.max_header_bytes:
                resp = self.answer_error("-", errors.HEADERS_TOO_LARGE, close=True)
                return resp
            request = origin_form(request)
            refused = refusal(request)
            if refused is not None:
                # Closed: what follows on the connection cannot be framed with confidence.
                resp = self.answer_error("-", *refused, close=True)
                return resp
            headers = request.headers
            match = runtime.router.match(request.host, request.path, request.method, headers)
            if match is None:
                resp = self.answer_error("-", errors.NO_ROUTE)
                return resp
            cr = runtime.clusters[match.cluster]
            cluster_name = cr.name
            length = request.content_length
            if limits.max_body_bytes is not None and length is not None and length > limits.max_body_bytes:
                resp = self.answer_error(cluster_name, errors.BODY_TOO_LARGE,
                                   f"{length} > {limits.max_body_bytes} bytes", close=True)
                return resp
            client_ip = request.remote or ""
            info = RequestInfo(request.method, request.path, match.route_class, length or 0,
                               client_ip, headers)
            if "Upgrade" in headers or "Expect" in headers:
                resp = await self._special(cr, request, info)
                if resp is not None:
                    return resp
            resp = await self._forward(runtime, cr, request, info, client_ip)
            return resp
        except asyncio.CancelledError:
            # Cut at the end of the drain: answered if nothing of a response went out
            # (not even a 100 Continue), else closed as aiohttp closes a cancelled handler.
            if not self._cutting or original.transport is None or original.writer.output_size > 0:
                raise
            # Cancelling the connection's task cancelled the handler's task it awaits: both count it.
            task.uncancel()
            handler_task = asyncio.current_task()
            if handler_task is not None:
                handler_task.uncancel()
            resp = self.answer_error(cluster_name, errors.SHUTTING_DOWN,
                                     "still in progress when the drain time ran out", close=True)
            return resp
        finally:
            self._inflight.discard(task)
            runtime.active -= 1
            self.active_requests -= 1
            key = (cluster_name, metrics.code_class(resp.status if resp is not None else 0))
            counts = metrics.HOT.requests
            counts[key] = counts.get(key, 0) + 1
            if self.access_log is not None:
                original[CLUSTER_KEY] = cluster_name

    async def _special(self, cr: ClusterRuntime, request: BaseRequest,
                       info: RequestInfo) -> web.StreamResponse | None:
        """Upgrade and Expect: a response when the request is fully handled here, else None."""
        headers = request.headers
        upgrade = headers.get("Upgrade", "")
        if upgrade.lower() == "websocket" and "upgrade" in headers.get("Connection", "").lower():
            from proxy.websocket import proxy_websocket

            return await proxy_websocket(self, cr, request, info)
        # Other upgrades (h2c, ...) are declined by forwarding as plain HTTP/1.1:
        # Upgrade is hop-by-hop, so the backend never sees the offer.
        if headers.get("Expect", "").lower() == "100-continue" and request.version >= HttpVersion11:
            # The limits passed, so tell the client to send its body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    # -- forwarding ---------------------------------------------------------------
    async def _forward(self, runtime: Runtime, cr: ClusterRuntime, request: BaseRequest,
                       info: RequestInfo, client_ip: str) -> web.StreamResponse:
        """Pick, try, and retry on a different backend while it is safe and allowed."""
        config = runtime.config
        plan = runtime.retry_plan
        up_headers, request_id = upstream_request_headers(
            request.headers, client_ip=client_ip, scheme=request.scheme, host=request.host,
            host_header=request.get(AUTHORITY_KEY))
        body = (RequestBody(request.content, config.limits.max_body_bytes, config.timeouts.client_body_idle_s)
                if request.body_exists else None)
        deadline = self._loop_time() + config.timeouts.total_s
        tried: set[str] = set()
        last_reason: str | None = None
        retrying = False
        try:
            for attempt in range(1, plan.attempts + 1):
                ready = cr.cluster.ready()
                candidates = ready if not tried else tuple(s for s in ready if s.id not in tried)
                chosen = cr.policy.pick(candidates, info) if candidates else None
                if chosen is None:
                    break
                state = cr.cluster.states.get(chosen.id)
                if state is None:  # a policy returned something that is not ours
                    raise RuntimeError(f"policy {cr.policy_name} returned unknown backend {chosen.id!r}")
                picks = metrics.HOT.picks
                picks[cr.pick_key] = picks.get(cr.pick_key, 0) + 1
                remaining_s = deadline - self._loop_time()
                if remaining_s <= 0:
                    last_reason = errors.TIMEOUT
                    break
                token = None
                if self.telemetry is not None:  # a decision that will be tried
                    propensity = getattr(cr.policy, "last_propensity", None)
                    token = self.telemetry.on_pick(cr.name, candidates, info, state, propensity)
                # Retry-worthy statuses are only held back when a retry could follow.
                statuses = plan.statuses if (attempt < plan.attempts and len(candidates) > 1 and (
                    retrying or self._retry_budget_allows(plan))) else _NONE
                try:
                    result = await self._attempt(runtime, cr, request, info, state, up_headers,
                                                 request_id, body, remaining_s, token, statuses)
                finally:
                    if token is not None:
                        self.telemetry.on_attempt_end(token)
                if not isinstance(result, tuple):
                    return result
                kind, status = result
                tried.add(state.id)
                if body is not None and body.failed:
                    if body.too_large:
                        return self.answer_error(cr.name, errors.BODY_TOO_LARGE, close=True)
                    return self.answer_error(cr.name, errors.BAD_REQUEST, "request body broke", close=True)
                last_reason = _REASON_OF_KIND.get(kind) if kind else errors.UPSTREAM_ERROR_STATUS
                body_started = body is not None and body.started
                if attempt == plan.attempts or not plan.may_retry(request.method, body_started, kind, status):
                    break
                if not retrying:
                    if not self._retry_budget_allows(plan):
                        metrics.RETRIES_DENIED.labels(cr.name).inc()
                        break
                    retrying = True
                    self.active_retries += 1
                metrics.retries(cr.name, last_reason).inc()
        finally:
            if retrying:
                self.active_retries -= 1
        if last_reason is None:
            return self.answer_error(cr.name, errors.NO_BACKEND,
                               "panic" if cr.cluster.panic else "no ready backend")
        return self.answer_error(cr.name, last_reason)

    def _retry_budget_allows(self, plan: RetryPlan) -> bool:
        return self.active_retries < max(plan.budget_min, plan.budget_share * self.active_requests)

    async def _attempt(self, runtime: Runtime, cr: ClusterRuntime, request: BaseRequest,
                       info: RequestInfo, state: BackendState, up_headers: Any, request_id: str,
                       body: RequestBody | None, remaining_s: float, token: Any,
                       retry_statuses: frozenset[int]) -> web.StreamResponse | tuple[str | None, int]:
        """One try. A response to send, or (error kind, status) of a failed try to maybe retry."""
        config = runtime.config
        with cr.cluster.track(state) as tracker:
            started = self._loop_time()
            kind: str | None = None
            up: UpstreamResponse | None = None
            timeouts = config.timeouts
            # per_try_s (or what is left of total_s) bounds the wait for the
            # response headers once the request is sent; the response body then
            # has per_try_s as its idle timeout.
            deadline = HeaderDeadline(self._loop, timeouts.per_try_s, remaining_s,
                                      start=body is None)
            try:
                up = await cr.upstream.request(
                    state.backend.url, request.method, request.rel_url.raw_path_qs, up_headers,
                    body.chunks() if body is not None else None,
                    connect_timeout_s=timeouts.connect_s, read_timeout_s=timeouts.per_try_s,
                    body_sent=deadline.start if body is not None else None)
            except ConnectFailed:
                kind = ERROR_CONNECT
            except TimeoutError:
                kind = ERROR_TIMEOUT
            except (UpstreamError, OSError):
                kind = ERROR_RESET
            except asyncio.CancelledError:
                if not deadline.expired():  # cancelled from outside (client gone, shutdown)
                    raise
                kind = ERROR_TIMEOUT
            finally:
                deadline.disarm()
            if body is not None and body.failed:
                # The client's body broke, not the backend: record nothing against it.
                if up is not None:
                    up.close()
                return kind, 0
            try:
                latency_s = self._loop_time() - started  # to the response head
                payload: bytes | None = None
                cut: tuple[str, str] | None = None  # (reason, detail): a small body cut short
                # A retry-worthy status is retried without reading its body.
                retry_status = (up is not None and up.status in retry_statuses and body is None
                                and request.method in IDEMPOTENT)
                # (Interim 1xx answers never get here: the upstream client skips them.)
                no_body = up is not None and (request.method == "HEAD" or up.status in (204, 304))
                if up is not None and not retry_status and (
                        no_body or (up.content_length is not None
                                    and up.content_length <= BUFFER_LIMIT_BYTES)):
                    # A small answer is read before the try counts: a backend that breaks
                    # off its body has failed the try, against its health.
                    try:
                        payload = b"" if no_body else await up.read()
                    except TimeoutError:
                        kind, cut = ERROR_TIMEOUT, (errors.TIMEOUT, "upstream body stalled")
                    except (UpstreamError, OSError):
                        kind, cut = ERROR_RESET, (errors.RESET, "upstream closed mid-body")
                    if cut is not None:
                        up.close()
                status = up.status if up is not None and cut is None else 0
                outcome = Outcome(status, latency_s, kind, 0, info.route_class)
                tracker.finish(outcome)
                hot = metrics.HOT
                key = (cr.name, state.id, metrics.code_class(status))
                hot.upstream[key] = hot.upstream.get(key, 0) + 1
                if kind is None:
                    hot.observe_latency(cr.name, state.id, latency_s)
                if cr.observe is not None:
                    cr.observe(state, info, outcome)
                if token is not None:
                    self.telemetry.on_outcome(token, outcome)
                if up is None:
                    return kind, 0
                if cut is not None:
                    if request.method in SAFE and body is None:
                        return kind, 0  # a read: retried like a reset, when allowed
                    # Not replayed: the backend answered, so it may have acted on the
                    # request (Envoy retries a reset only when nothing came back).
                    return self.answer_error(cr.name, *cut)
                load_report = up.headers.get(LOAD_HEADER)
                if load_report is not None:
                    cr.cluster.set_reported_load(state.id, parse_utilization(load_report))
                if retry_status:
                    up.release()
                    return None, status
                if payload is not None:
                    up.release()
                    headers = client_response_headers(up.headers, backend_id=state.id,
                                                      request_id=request_id)
                    return RelayedResponse(status=status, reason=up.reason, headers=headers,
                                           body=None if no_body else payload)
                return await self._stream_response(request, up, state.id, request_id, cr.name)
            except BaseException:
                # Whatever raised (a policy hook, the client gone): never leave the
                # connection open outside the pool. A no-op once released.
                if up is not None:
                    up.close()
                raise

    async def _stream_response(self, request: BaseRequest, up: UpstreamResponse, backend_id: str,
                               request_id: str, cluster: str) -> web.StreamResponse:
        """Relay a body too large to read first, or of unknown length, as it arrives."""
        headers = client_response_headers(up.headers, backend_id=backend_id, request_id=request_id)
        resp = RelayedStreamResponse(status=up.status, reason=up.reason, headers=headers)
        complete = False
        try:
            await resp.prepare(request)
            async for chunk in up.iter_chunks():
                await resp.write(chunk)
            await resp.write_eof()
            complete = True
        except (UpstreamError, OSError) as exc:
            # Headers are out: cut the client's connection so it sees a broken
            # response (finishing it normally would pass half a body as whole).
            metrics.errors(cluster, errors.RESET).inc()
            log.warning("stream from %s broke after headers: %r", backend_id, exc)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError(f"upstream {backend_id} broke mid-body") from exc
        finally:
            if complete:
                up.release()
            else:
                up.close()
        return resp

    async def cut(self, grace_s: float) -> int:
        """Cancel every request in progress (SIGTERM's drain time is over): one whose response
        has not started is answered 503 shutting_down, one whose has is closed. Waits up to
        `grace_s` for them to finish; returns how many there were."""
        self._cutting = True
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        return len(tasks)

    def answer_error(self, cluster: str, reason: str, detail: str = "", *,
                     close: bool = False) -> web.Response:
        metrics.errors(cluster, reason).inc()
        return errors.error_response(reason, detail, close=close)


def _header_bytes(request: BaseRequest) -> int:
    # name + ": " + value + CRLF for every header line (summed in C, not a genexpr)
    raw = request.raw_headers
    return sum(map(len, chain.from_iterable(raw))) + 4 * len(raw)

