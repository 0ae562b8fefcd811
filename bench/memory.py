"""Proxy memory: one worker's RSS at idle and while holding many keep-alive connections.

`foretell bench memory [--connections 1000] [--hold-s 20]` starts two fast
simulated backends, the proxy (one worker, its own process), and then opens
N client connections that each send a request about once a second for the
hold time, keeping every connection alive. It reports the proxy's RSS at
idle (after a short warm-up) and the peak RSS while the connections are held.
Loopback only; every process is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

from bench.fleet import Fleet, ServiceTime, SimBackend, free_ports
from bench.process import stop_process, wait_http_ok

TARGET_MB_AT_1000 = 150.0
REQUEST_INTERVAL_S = 1.0


@dataclass
class MemoryResult:
    connections: int
    idle_rss_mb: float
    peak_rss_mb: float
    requests: int
    failures: int
    open_connections_seen: int


def _config(port: int, admin_port: int, backends: list[SimBackend]) -> str:
    lines = [
        f"listen: {{host: 127.0.0.1, port: {port}, backlog: 4096}}",
        f"admin: {{host: 127.0.0.1, port: {admin_port}}}",
        "policy: p2c_peak_ewma",
        "backends:",
        *[f"  - {{id: {b.id}, url: \"{b.url}\"}}" for b in backends],
    ]
    return "\n".join(lines) + "\n"


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _hold(url: str, connections: int, hold_s: float, proxy: psutil.Process) -> MemoryResult:
    # A session (and so a connection) of its own per client: a shared pool would
    # reuse idle connections and hold only as many as are busy at once.
    timeout = aiohttp.ClientTimeout(total=30)
    stats = {"requests": 0, "failures": 0}
    peak_rss = proxy.memory_info().rss
    max_conns = 0
    stop_at = time.monotonic() + hold_s
    rng = random.Random(0)

    async def client(i: int) -> None:
        connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=hold_s + 30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.sleep(rng.uniform(0, REQUEST_INTERVAL_S))
            while time.monotonic() < stop_at:
                try:
                    async with session.get(f"{url}/c{i}") as resp:
                        await resp.read()
                        stats["failures"] += resp.status != 200
                except (aiohttp.ClientError, TimeoutError):
                    stats["failures"] += 1
                stats["requests"] += 1
                await asyncio.sleep(REQUEST_INTERVAL_S)

    tasks = [asyncio.create_task(client(i)) for i in range(connections)]
    while any(not t.done() for t in tasks):
        peak_rss = max(peak_rss, proxy.memory_info().rss)
        max_conns = max(max_conns, len(proxy.net_connections(kind="tcp")))
        await asyncio.sleep(0.5)
    await asyncio.gather(*tasks)
    return MemoryResult(connections, 0.0, peak_rss / 2**20, stats["requests"], stats["failures"], max_conns)


def run_memory(connections: int, hold_s: float) -> MemoryResult:
    _raise_fd_limit()
    ports = free_ports(4)
    backends = [SimBackend(id=f"fast-{i}", port=ports[i], slots=4096,
                           service=ServiceTime("constant", mean_ms=0.0)) for i in range(2)]
    workdir = Path(tempfile.mkdtemp(prefix="foretell-memory-"))
    config = workdir / "config.yaml"
    config.write_text(_config(ports[2], ports[3], backends))
    with Fleet(backends, max_lifetime_s=hold_s + 120):
        log = (workdir / "proxy.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{ports[2]}"

            async def main() -> MemoryResult:
                await wait_http_ok(f"http://127.0.0.1:{ports[3]}/ready", 20.0,
                                   alive=lambda: proc.poll() is None)
                proxy = psutil.Process(proc.pid)
                async with aiohttp.ClientSession() as session:
                    for _ in range(200):  # warm-up: imports, pools, caches
                        async with session.get(url + "/warm") as resp:
                            await resp.read()
                await asyncio.sleep(1.0)
                idle_mb = proxy.memory_info().rss / 2**20
                result = await _hold(url, connections, hold_s, proxy)
                result.idle_rss_mb = idle_mb
                return result

            return asyncio.run(main())
        finally:
            stop_process(proc, timeout_s=20)
            log.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="foretell bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--hold-s", type=float, default=20.0)
    args = parser.parse_args(argv)
    r = run_memory(args.connections, args.hold_s)
    print("| proxy (1 worker) | RSS MB |\n|---|---|")
    print(f"| idle, after warm-up | {r.idle_rss_mb:.1f} |")
    print(f"| {r.connections} keep-alive connections, ~{r.connections / REQUEST_INTERVAL_S:.0f} req/s, "
          f"peak | {r.peak_rss_mb:.1f} |")
    print(f"\nrequests {r.requests}, failures {r.failures}, "
          f"max proxy TCP sockets seen {r.open_connections_seen}; "
          f"target at 1000 connections: < {TARGET_MB_AT_1000:.0f} MB")
    return 0 if r.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
