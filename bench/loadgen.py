"""Load generator: open-loop (Poisson or constant schedule) or closed-loop, loopback only.

Open loop is the default and the honest one: send times are fixed in
advance, and latency is counted from the *intended* send time, so a proxy
that stalls cannot hide its tail by slowing the client down (coordinated
omission). A request that has no answer by its deadline is a failure
recorded at the deadline. Closed loop (`mode="closed"`: N workers, each
sending its next request when the previous one finished) is there for
comparison with tools like wrk, and is labelled as such in every record file.

It runs in its own process (`python -m bench.loadgen --spec JSON --out
FILE.npz`, or `start()` / `run()` from Python), bounded by
`duration_s + deadline_s`, and writes one record per request.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

BACKEND_HEADER = "x-backend-id"
PROXY_BACKEND_HEADER = "x-foretell-backend"
# The reason on an answer the proxy gave itself (proxy/errors.py); its 5xx are counted
# by reason in the records' meta.
PROXY_ERROR_HEADER = "x-foretell-error"
# Bodies of the proxy's own answers kept per run (its detail says which tries failed how).
_ERROR_EXAMPLES_MAX = 5

# Error codes in the `error` column.
ERR_NONE = 0
ERR_DEADLINE = 1
ERR_CONNECT = 2
ERR_RESET = 3
ERR_OTHER = 4
ERROR_NAMES = {ERR_NONE: "", ERR_DEADLINE: "deadline", ERR_CONNECT: "connect",
               ERR_RESET: "reset", ERR_OTHER: "other"}


class LoadgenError(RuntimeError):
    pass


@dataclass(frozen=True)
class RouteMix:
    """One kind of request in the mix, drawn with probability proportional to `weight`."""

    path: str
    weight: float = 1.0
    method: str = "GET"
    body_bytes: int = 0


@dataclass(frozen=True)
class LoadSpec:
    url: str  # base URL of the target, e.g. http://127.0.0.1:8080
    rate_rps: float
    duration_s: float
    routes: tuple[RouteMix, ...] = (RouteMix("/"),)
    schedule: Literal["poisson", "constant"] = "poisson"
    # Piecewise-linear rate multiplier over time: ((t_s, multiplier), ...); empty = flat.
    rate_profile: tuple[tuple[float, float], ...] = ()
    deadline_s: float = 2.0
    seed: int = 0
    mode: Literal["open", "closed"] = "open"
    concurrency: int = 32  # closed loop only
    max_connections: int = 2000
    # time.monotonic() at which the schedule starts (None: as soon as ready);
    # records carry times relative to `origin_s` (default: the start).
    start_at_s: float | None = None
    origin_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rate_rps <= 0 and self.mode == "open":
            raise LoadgenError(f"rate_rps must be > 0, got {self.rate_rps}")
        if self.duration_s <= 0:
            raise LoadgenError(f"duration_s must be > 0, got {self.duration_s}")
        if not self.routes:
            raise LoadgenError("routes must not be empty")
        if self.schedule not in ("poisson", "constant") or self.mode not in ("open", "closed"):
            raise LoadgenError(f"unknown schedule {self.schedule!r} or mode {self.mode!r}")
        check_loopback(self.url)

    def rate_at(self, t_s: float) -> float:
        prof = self.rate_profile
        if not prof:
            return self.rate_rps
        if t_s <= prof[0][0]:
            return self.rate_rps * prof[0][1]
        for (t0, m0), (t1, m1) in itertools.pairwise(prof):
            if t_s <= t1:
                return self.rate_rps * (m0 + (m1 - m0) * (t_s - t0) / (t1 - t0))
        return self.rate_rps * prof[-1][1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadSpec:
        data = dict(data)
        data["routes"] = tuple(RouteMix(**r) for r in data["routes"])
        data["rate_profile"] = tuple(tuple(p) for p in data.get("rate_profile", ()))
        return cls(**data)


def check_loopback(url: str) -> None:
    """Refuse any target that is not this machine's loopback interface."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadgenError(f"target must be an http(s) URL, got {url!r}")
    host = parts.hostname
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        if host != "localhost":
            raise LoadgenError(f"refusing target {url!r}: only loopback addresses "
                               "(127.0.0.0/8, ::1, localhost) may be load-tested") from None
        addrs = [ipaddress.ip_address(ai[4][0]) for ai in socket.getaddrinfo(host, None)]
    bad = [str(a) for a in addrs if not a.is_loopback]
    if bad:
        raise LoadgenError(f"refusing target {url!r}: {', '.join(bad)} is not a loopback address; "
                           "load tests stay on 127.0.0.1 / ::1")


def schedule_s(spec: LoadSpec, rng: random.Random) -> list[float]:
    """Intended send times (seconds from the start) for an open-loop run."""
    out: list[float] = []
    t = 0.0
    while True:
        rate = spec.rate_at(t)
        if rate <= 0:
            t += 0.01  # a zero-rate stretch: step over it
        else:
            t += rng.expovariate(rate) if spec.schedule == "poisson" else 1.0 / rate
        if t >= spec.duration_s:
            return out
        out.append(t)


@dataclass
class Records:
    """One row per request. Times in seconds; `intended_s` relative to the run's origin."""

    intended_s: np.ndarray  # float64
    latency_s: np.ndarray  # float64, from intended send time (open) or actual send (closed)
    send_lag_s: np.ndarray  # float64, actual send - intended send (client lag)
    status: np.ndarray  # int32, 0 when there was no HTTP response
    error: np.ndarray  # int8, ERR_*
    backend: np.ndarray  # int16 index into backend_ids, -1 when unknown
    route: np.ndarray  # int16 index into routes
    backend_ids: list[str]
    routes: list[str]
    mode: str = "open"
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.intended_s)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, intended_s=self.intended_s, latency_s=self.latency_s,
                 send_lag_s=self.send_lag_s, status=self.status, error=self.error,
                 backend=self.backend, route=self.route,
                 backend_ids=np.array(self.backend_ids, dtype=str),
                 routes=np.array(self.routes, dtype=str),
                 meta=np.array(json.dumps({**self.meta, "mode": self.mode})))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Records:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(intended_s=z["intended_s"], latency_s=z["latency_s"],
                       send_lag_s=z["send_lag_s"], status=z["status"], error=z["error"],
                       backend=z["backend"], route=z["route"],
                       backend_ids=[str(x) for x in z["backend_ids"]],
                       routes=[str(x) for x in z["routes"]], mode=meta.pop("mode"), meta=meta)

    @property
    def ok(self) -> np.ndarray:
        return (self.error == ERR_NONE) & (self.status > 0) & (self.status < 500)


class _Collector:
    def __init__(self, n_hint: int) -> None:
        self.intended: list[float] = []
        self.latency: list[float] = []
        self.lag: list[float] = []
        self.status: list[int] = []
        self.error: list[int] = []
        self.backend: list[int] = []
        self.route: list[int] = []
        self.backend_index: dict[str, int] = {}
        self.proxy_errors: dict[str, int] = {}
        self.proxy_error_examples: list[str] = []

    def add_proxy_error(self, reason: str, body: bytes) -> None:
        self.proxy_errors[reason] = self.proxy_errors.get(reason, 0) + 1
        if len(self.proxy_error_examples) < _ERROR_EXAMPLES_MAX:
            self.proxy_error_examples.append(body[:300].decode(errors="replace").strip())

    def add(self, intended: float, latency: float, lag: float, status: int, error: int,
            backend: str | None, route: int) -> None:
        self.intended.append(intended)
        self.latency.append(latency)
        self.lag.append(lag)
        self.status.append(status)
        self.error.append(error)
        if backend is None:
            self.backend.append(-1)
        else:
            idx = self.backend_index.get(backend)
            if idx is None:
                idx = self.backend_index[backend] = len(self.backend_index)
            self.backend.append(idx)
        self.route.append(route)

    def records(self, spec: LoadSpec, meta: dict[str, Any]) -> Records:
        order = np.argsort(np.asarray(self.intended, dtype=np.float64), kind="stable")
        return Records(
            intended_s=np.asarray(self.intended, dtype=np.float64)[order],
            latency_s=np.asarray(self.latency, dtype=np.float64)[order],
            send_lag_s=np.asarray(self.lag, dtype=np.float64)[order],
            status=np.asarray(self.status, dtype=np.int32)[order],
            error=np.asarray(self.error, dtype=np.int8)[order],
            backend=np.asarray(self.backend, dtype=np.int16)[order],
            route=np.asarray(self.route, dtype=np.int16)[order],
            backend_ids=list(self.backend_index),
            routes=[r.path for r in spec.routes], mode=spec.mode,
            meta={**meta, "proxy_errors": self.proxy_errors,
                  "proxy_error_examples": self.proxy_error_examples})


async def run(spec: LoadSpec) -> Records:
    """Run the load in this event loop (the CLI runs it in a process of its own)."""
    import aiohttp

    rng = random.Random(spec.seed)
    weights = [r.weight for r in spec.routes]
    bodies = [b"x" * r.body_bytes if r.body_bytes else None for r in spec.routes]
    base = spec.url.rstrip("/")
    urls = [base + r.path for r in spec.routes]
    col = _Collector(int(spec.rate_rps * spec.duration_s))
    deadline_s = spec.deadline_s
    headers = dict(spec.headers)

    connector = aiohttp.TCPConnector(limit=spec.max_connections, limit_per_host=0,
                                     ttl_dns_cache=None, enable_cleanup_closed=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=deadline_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False, skip_auto_headers=("User-Agent",),
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:

        async def one(ri: int, intended_abs: float, latency_from: float) -> None:
            sent = time.monotonic()
            route = spec.routes[ri]
            status, err, backend = 0, ERR_NONE, None
            try:
                async with asyncio.timeout(max(0.0, intended_abs + deadline_s - sent)):
                    async with session.request(route.method, urls[ri], data=bodies[ri],
                                               headers=headers) as resp:
                        body = await resp.read()
                        status = resp.status
                        backend = resp.headers.get(BACKEND_HEADER) or resp.headers.get(
                            PROXY_BACKEND_HEADER)
                        reason = resp.headers.get(PROXY_ERROR_HEADER)
                        if reason is not None and status >= 500:
                            col.add_proxy_error(reason, body)
                latency = time.monotonic() - latency_from
            except TimeoutError:
                err, latency = ERR_DEADLINE, intended_abs + deadline_s - latency_from
            except aiohttp.ClientConnectorError:
                err, latency = ERR_CONNECT, time.monotonic() - latency_from
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError):
                err, latency = ERR_RESET, time.monotonic() - latency_from
            except aiohttp.ClientError:
                err, latency = ERR_OTHER, time.monotonic() - latency_from
            col.add(intended_abs - origin, latency, sent - intended_abs, status, err, backend, ri)

        start = spec.start_at_s if spec.start_at_s is not None else time.monotonic() + 0.05
        origin = spec.origin_s if spec.origin_s is not None else start
        tasks: set[asyncio.Task[None]] = set()
        if spec.mode == "open":
            times = schedule_s(spec, rng)
            route_idx = rng.choices(range(len(spec.routes)), weights=weights, k=len(times))
            for t, ri in zip(times, route_idx, strict=True):
                intended = start + t
                delay = intended - time.monotonic()
                if delay > 0.001:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(ri, intended, intended))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        else:
            end = start + spec.duration_s

            async def worker(wrng: random.Random) -> None:
                await asyncio.sleep(max(0.0, start - time.monotonic()))
                while (now := time.monotonic()) < end:
                    ri = wrng.choices(range(len(spec.routes)), weights=weights)[0]
                    await one(ri, now, now)

            for w in range(spec.concurrency):
                task = asyncio.create_task(worker(random.Random(spec.seed * 7919 + w)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:
            # Every request ends by its deadline, so this wait is bounded.
            await asyncio.wait(set(tasks), timeout=deadline_s + spec.duration_s + 5.0)
        for task in tasks:
            task.cancel()
    meta = {"url": spec.url, "rate_rps": spec.rate_rps, "duration_s": spec.duration_s,
            "schedule": spec.schedule, "deadline_s": deadline_s, "seed": spec.seed,
            "start_s": start - origin}
    return col.records(spec, meta)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen",
                                     description="open-loop HTTP load generator (loopback only)")
    parser.add_argument("--spec", help="LoadSpec as JSON")
    parser.add_argument("--url", help="target base URL (instead of --spec)")
    parser.add_argument("--rate-rps", type=float, default=100.0)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--closed", type=int, default=0, metavar="N",
                        help="CLOSED-LOOP mode with N concurrent workers (not open-loop!)")
    parser.add_argument("--out", required=True, help="records file (.npz)")
    args = parser.parse_args(argv)
    try:
        if args.spec:
            spec = LoadSpec.from_json(json.loads(args.spec))
        elif args.url:
            spec = LoadSpec(url=args.url, rate_rps=args.rate_rps, duration_s=args.duration_s,
                            mode="closed" if args.closed else "open",
                            concurrency=max(1, args.closed))
        else:
            parser.error("give --spec or --url")
    except LoadgenError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        records = runner.run(run(spec))
    records.save(args.out)
    ok = int(records.ok.sum())
    print(f"loadgen: {len(records)} requests ({spec.mode}-loop), {ok} ok -> {args.out}",
          file=sys.stderr)
    return 0


def start(spec: LoadSpec, out: str | Path) -> subprocess.Popen[bytes]:
    """Start the load generator as a child process; `wait(proc)` collects the records."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", "--spec", json.dumps(spec.to_json()),
         "--out", str(out)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait(proc: subprocess.Popen[bytes], spec: LoadSpec, out: str | Path) -> Records:
    """Wait for a child started by `start` (bounded) and load its records."""
    limit_s = spec.duration_s + spec.deadline_s + 30.0
    if spec.start_at_s is not None:
        limit_s += max(0.0, spec.start_at_s - time.monotonic())
    try:
        _, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise LoadgenError(f"load generator did not finish within {limit_s:.0f} s") from None
    if proc.returncode != 0:
        raise LoadgenError(f"load generator failed ({proc.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}")
    return Records.load(out)


def run_process(spec: LoadSpec, out: str | Path) -> Records:
    """Run the load generator in its own process and return its records."""
    return wait(start(spec, out), spec, out)


def latency_quantiles_ms(rec: Records, qs: Sequence[float] = (50, 99, 99.9)) -> list[float]:
    """Latency percentiles in ms; failures count at their recorded latency (the deadline)."""
    if len(rec) == 0:
        return [math.nan for _ in qs]
    return [float(v) * 1e3 for v in np.percentile(rec.latency_s, list(qs))]


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
