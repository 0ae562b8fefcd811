"""`foretell demo`: a simulated fleet, the proxy in front of it, and a little traffic.

The fleet (bench/fleet.py) runs on the loopback ports named in the config's
backends; the proxy runs as its own process exactly as `foretell serve`
would; a light request stream goes through it so the per-backend table
printed every few seconds shows routing at work. Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from proxy.config import Config, ConfigError
from proxy.loader import load

DEMO_RATE_RPS = 20.0
REPORT_EVERY_S = 5.0
DEMO_PATHS = ("/search?q=demo", "/render/page", "/search?q=other", "/")
START_TIMEOUT_S = 20.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class DemoError(Exception):
    pass


def _fleet_ports(config: Config) -> list[tuple[str, int]]:
    out = []
    for cluster in config.clusters.values():
        for b in cluster.backends:
            parts = urlsplit(b.url)
            if parts.hostname not in LOOPBACK or parts.scheme != "http":
                raise DemoError(f"demo simulates loopback http backends only; {b.id} is {b.url}")
            out.append((b.id, parts.port or 80))
    return out


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the proxy exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise DemoError(f"the proxy did not answer {url} within {timeout_s:.0f} s")


async def _traffic(base_url: str, admin_url: str, stop: asyncio.Event, rate_rps: float) -> None:
    rng = random.Random(0)
    async with aiohttp.ClientSession() as session:
        last_report = time.monotonic()
        sent = failed = 0
        next_at = time.monotonic()
        while not stop.is_set():
            path = rng.choice(DEMO_PATHS)
            # Paced by start times, so the rate holds whatever the answers take (one at a
            # time: after an answer slower than the gap, the next go at once until on time).
            next_at += rng.expovariate(rate_rps)
            try:
                async with session.get(base_url + path) as resp:
                    await resp.read()
                    failed += resp.status >= 500
            except aiohttp.ClientError:
                failed += 1
            sent += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
            if time.monotonic() - last_report >= REPORT_EVERY_S:
                last_report = time.monotonic()
                await _print_backends(session, admin_url, sent, failed)


async def _print_backends(session: aiohttp.ClientSession, admin_url: str, sent: int, failed: int) -> None:
    try:
        async with session.get(admin_url + "/backends") as resp:
            snapshot = await resp.json()
    except (aiohttp.ClientError, json.JSONDecodeError) as exc:
        print(f"(admin not reachable: {exc})")
        return
    print(f"\n-- demo traffic: {sent} requests sent, {failed} failed --")
    for name, cluster in snapshot["clusters"].items():
        print(f"cluster {name} (policy {cluster['policy']}):")
        print(f"  {'backend':<10} {'health':<8} {'requests':>8} {'errors':>6} {'inflight':>8} {'ewma_ms':>8}")
        for b in cluster["backends"]:
            ewma = "-" if b["ewma_ms"] is None else f"{b['ewma_ms']:.1f}"
            print(f"  {b['id']:<10} {b['health']:<8} {b['requests']:>8} {b['errors']:>6} "
                  f"{b['inflight']:>8} {ewma:>8}")


def run_demo(config_path: str | Path, duration_s: float | None = None,
             rate_rps: float = DEMO_RATE_RPS) -> int:
    try:
        loaded = load(config_path)
        ports = _fleet_ports(loaded.config)
    except (ConfigError, DemoError) as exc:
        print(exc, file=sys.stderr)
        return 2
    from bench.fleet import Fleet, FleetError, demo_fleet

    sims = [dataclasses.replace(sim, id=backend_id)
            for sim, (backend_id, _) in zip(demo_fleet([p for _, p in ports]), ports, strict=True)]
    config = loaded.config
    host = config.listen.host if config.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
    scheme = "https" if config.listen.tls else "http"
    base_url = f"{scheme}://{host}:{config.listen.port}"
    admin_url = f"http://{config.admin.host}:{config.admin.port}"
    fleet = Fleet(sims, max_lifetime_s=duration_s + 30 if duration_s else 7 * 24 * 3600)
    try:
        fleet.start()
    except FleetError as exc:  # a port taken, a backend that would not start
        print(f"demo fleet: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"fleet: {', '.join(f'{s.id} on :{s.port} (x{s.speed:g} speed)' for s in fleet)}")
        proxy = subprocess.Popen([sys.executable, "-m", "proxy", "--config", str(config_path)])
        try:
            _wait_http(admin_url + "/ready", START_TIMEOUT_S, proxy)
            print(f"\nForetell is routing on {base_url}  (admin: {admin_url})\n"
                  f"  try:  curl -i '{base_url}/search?q=hello'\n"
                  f"        curl {admin_url}/backends\n"
                  f"        curl {admin_url}/metrics\n"
                  f"sending ~{rate_rps:g} requests/s of demo traffic; Ctrl-C stops everything.")
            return _run_traffic(base_url, admin_url, duration_s, rate_rps, proxy)
        except DemoError as exc:
            print(exc, file=sys.stderr)
            return 1
        finally:
            if proxy.poll() is None:
                proxy.send_signal(signal.SIGTERM)
                try:
                    proxy.wait(timeout=config.timeouts.drain_s + 5)
                except subprocess.TimeoutExpired:
                    proxy.kill()
                    proxy.wait()
    finally:
        fleet.stop()
        print("demo stopped: proxy and fleet are down.")


def _run_traffic(base_url: str, admin_url: str, duration_s: float | None, rate_rps: float,
                 proxy: subprocess.Popen[bytes]) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if duration_s is not None:
            loop.call_later(duration_s, stop.set)

        async def watch_proxy() -> None:
            while proxy.poll() is None and not stop.is_set():
                await asyncio.sleep(0.5)
            stop.set()

        watcher = asyncio.create_task(watch_proxy())
        await _traffic(base_url, admin_url, stop, rate_rps)
        await watcher

    asyncio.run(main())
    return 0 if proxy.poll() is None else 1
