"""WebSocket pass-through: accept the client's upgrade, open one upstream, relay frames."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.web_request import BaseRequest

from policies.base import RequestInfo
from proxy import errors
from proxy.headers import upstream_request_headers
from proxy.state import ERROR_CONNECT, ERROR_RESET, ERROR_TIMEOUT, Outcome

if TYPE_CHECKING:
    from proxy.runtime import ClusterRuntime
    from proxy.server import Proxy

# The WebSocket handshake headers are made anew by each side.
_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                        "sec-websocket-protocol", "sec-websocket-accept", "host"})


async def proxy_websocket(proxy: Proxy, cr: ClusterRuntime, request: BaseRequest,
                          info: RequestInfo) -> web.StreamResponse:
    # Check the client's handshake before opening anything upstream.
    probe = web.WebSocketResponse()
    if not probe.can_prepare(request).ok:
        return proxy.answer_error(cr.name, errors.BAD_REQUEST, "invalid WebSocket handshake")
    chosen = cr.policy.pick(cr.cluster.ready(), info)
    if chosen is None:
        return proxy.answer_error(cr.name, errors.NO_BACKEND)
    state = cr.cluster.states[chosen.id]
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                 if p.strip()]
    forwarded, _ = upstream_request_headers(request.headers, client_ip=request.remote or "",
                                            scheme=request.scheme, host=request.host)
    headers = [(k, v) for k, v in forwarded if k.lower() not in _HANDSHAKE]
    url = state.backend.url.replace("http", "ws", 1) + request.rel_url.raw_path_qs
    loop_time = asyncio.get_running_loop().time
    timeout_s = proxy.runtime.config.timeouts.per_try_s
    with cr.cluster.track(state) as tracker:
        started = loop_time()
        try:
            async with asyncio.timeout(timeout_s):
                session = cr.upstream.websocket_session()
                upstream = await session.ws_connect(url, headers=headers, protocols=protocols, autoping=False)
        except aiohttp.WSServerHandshakeError as exc:
            tracker.finish(Outcome(exc.status, loop_time() - started, None, 0, info.route_class))
            # A refusal (403, 426, 500, ...) is passed on; a 101 without a valid handshake
            # or a 2xx/3xx is no answer to an upgrade, and passed on it would tell the
            # client the upgrade happened (a 101) or that a page came back: 502.
            status = exc.status if exc.status >= 400 else 502
            return web.Response(status=status, text="upstream refused the WebSocket upgrade\n",
                                headers={errors.ERROR_HEADER: "upstream_refused_upgrade",
                                         "x-foretell-backend": state.id})
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            tracker.finish(Outcome(0, loop_time() - started, ERROR_CONNECT, 0, info.route_class))
            return proxy.answer_error(cr.name, errors.CONNECT_FAILURE)
        except TimeoutError:
            tracker.finish(Outcome(0, loop_time() - started, ERROR_TIMEOUT, 0, info.route_class))
            return proxy.answer_error(cr.name, errors.TIMEOUT)
        except (aiohttp.ClientError, OSError):
            tracker.finish(Outcome(0, loop_time() - started, ERROR_RESET, 0, info.route_class))
            return proxy.answer_error(cr.name, errors.RESET)
        tracker.finish(Outcome(101, loop_time() - started, None, 0, info.route_class))
        client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                       autoping=False)
        client.headers["x-foretell-backend"] = state.id
        relays: list[asyncio.Task[None]] = []
        try:
            await client.prepare(request)
            relays = [asyncio.create_task(_relay(client, upstream)),
                      asyncio.create_task(_relay(upstream, client))]
            await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in relays:
                task.cancel()
            for task in relays:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await upstream.close()
            await client.close()
        return client


async def _relay(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                 dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    async for msg in src:
        if msg.type is WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await dst.pong(msg.data)
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            break
    await dst.close(code=src.close_code or 1000)
