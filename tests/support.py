"""Test helpers: real aiohttp backends and a real proxy on loopback ports."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from policies.base import PolicyOptions

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 64 * 1024


def backend_app(name: str) -> web.Application:
    """A backend that can echo, stream, fail, stall and speak WebSocket."""
    routes = web.RouteTableDef()

    @routes.route("*", "/echo{tail:.*}")
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({
            "backend": name, "method": request.method, "path": request.path_qs,
            "headers": {k: v for k, v in request.headers.items()},
            "body_len": len(body), "body_sha": hashlib.sha256(body).hexdigest(),
        }, headers={"x-backend-id": name})

    @routes.get("/status/{code}")
    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text=name,
                            headers={"x-backend-id": name})

    @routes.get("/sleep/{ms}")
    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.Response(text=name, headers={"x-backend-id": name})

    @routes.get("/bytes/{n}")
    async def stream_bytes(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"x-backend-id": name})
        if request.query.get("length") == "1":
            resp.content_length = n
        await resp.prepare(request)
        block = b"x" * CHUNK
        sent = 0
        while sent < n:
            part = block[: min(CHUNK, n - sent)]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp

    @routes.post("/upload")
    async def upload(request: web.Request) -> web.Response:
        total = 0
        digest = hashlib.sha256()
        async for chunk in request.content.iter_chunked(CHUNK):
            total += len(chunk)
            digest.update(chunk)
        return web.json_response({"backend": name, "received": total, "sha": digest.hexdigest()})

    @routes.get("/ws")
    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await sock.send_str(f"{name}:{msg.data}")
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        return sock

    @routes.get("/healthz")
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @routes.get("/load")
    async def load(request: web.Request) -> web.Response:
        return web.Response(text=name, headers={"endpoint-load-metrics": "TEXT cpu_utilization=0.42"})

    app = web.Application()
    app.add_routes(routes)
    return app


class Backends:
    """Backends started in the test's event loop, each on its own loopback port."""

    def __init__(self) -> None:
        self.runners: dict[str, web.AppRunner] = {}
        self.urls: dict[str, str] = {}

    async def start(self, name: str, app: web.Application | None = None, port: int = 0) -> str:
        runner = web.AppRunner(app or backend_app(name), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.runners[name] = runner
        self.urls[name] = f"http://127.0.0.1:{bound}"
        return self.urls[name]

    async def stop(self, name: str) -> None:
        await self.runners.pop(name).cleanup()

    async def close(self) -> None:
        for name in list(self.runners):
            await self.stop(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_config(urls: dict[str, str], **extra: Any) -> dict[str, Any]:
    """A small config: listen and admin on ephemeral ports, active probes off unless asked."""
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "backends": [{"id": name, "url": url} for name, url in urls.items()],
        "policy": {"kind": "round_robin"},
        "health": {"active": {"enabled": False}},
    }
    cfg.update(extra)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class ProxyProcess:
    """`python -m proxy --config FILE` as a child process, as a user runs it."""

    def __init__(self, config_path: Path, port: int, admin_port: int) -> None:
        self.config_path = config_path
        self.port = port
        self.admin_port = admin_port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.log_path = config_path.with_suffix(".log")
        self._log = self.log_path.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "--config", str(config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"proxy not ready in {timeout_s} s:\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


async def fetch_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return json.loads(await resp.text())


async def aiter_bytes(total: int, chunk: int = CHUNK) -> AsyncIterator[bytes]:
    block = b"y" * chunk
    sent = 0
    while sent < total:
        part = block[: min(chunk, total - sent)]
        sent += len(part)
        yield part


class FailingPolicy:
    """A user policy (dotted-path kind) whose constructor fails: for reload tests."""

    name = "failing"

    Options = PolicyOptions

    def __init__(self, options: object, ctx: object) -> None:
        raise RuntimeError("this policy cannot be built")

    def pick(self, ready: object, req: object) -> None:
        return None


class FirstReady:
    """A user policy (dotted-path kind) that always picks the first ready backend: tests
    that need to know which backend a request tries first."""

    name = "first_ready"

    Options = PolicyOptions

    def __init__(self, options: object, ctx: object) -> None:
        pass

    def pick(self, ready: Any, req: object) -> Any:
        return ready[0] if ready else None


class ObserveRaises(FirstReady):
    """A user policy (dotted-path kind) whose optional observe() hook raises: a bug in
    user code must not leak the upstream connection of the request it broke."""

    name = "observe_raises"

    def observe(self, state: object, info: object, outcome: object) -> None:
        raise RuntimeError("bug in a user policy's observe()")


async def raw_backend(respond: Any) -> tuple[asyncio.AbstractServer, str]:
    """A loopback TCP server whose connections are handled by `respond(reader, writer)`."""
    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"
