"""The floor: a minimal round-robin reverse proxy, aiohttp + uvloop, nothing else.

`foretell bench overhead` runs it beside nginx, haproxy and Foretell so
Foretell's cost can be read against the cheapest proxy Python can be.
Usage: python -m bench.minimal_proxy --port 8081 http://127.0.0.1:9001 ...
"""

from __future__ import annotations

import argparse
import itertools
import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host",
       "proxy-connection", "content-length"}


def make_app(backends: list[str]) -> web.Application:
    ring = itertools.cycle(backends)

    async def start(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        app["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        url = next(ring) + request.path_qs
        async with request.app["session"].request(request.method, url, headers=headers,
                                                  data=body or None) as up:
            data = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            return web.Response(status=up.status, body=data, headers=out)

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.minimal_proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("backends", nargs="+", help="http://host:port of each backend")
    args = parser.parse_args(argv)
    import uvloop

    web.run_app(make_app([b.rstrip("/") for b in args.backends]), host=args.host,
                port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
