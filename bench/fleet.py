"""Simulated backends: aiohttp servers that queue, each in its own process.

A `SimBackend` is data: worker slots, a service-time distribution, a speed
factor, per-route cost multipliers and a scripted timeline of `Event`s. A
`Fleet` starts one child process per backend (`python -m bench.fleet --spec
JSON`), never in the caller's process, waits until every port accepts, and
stops them by PID. Every child also exits by itself after `max_lifetime_s`
or when its parent disappears, so a crashed bench leaves nothing running.

Service times are really slept while holding a slot (asyncio.Semaphore), so
a backend with `slots` workers queues the way a real server does.

Event timelines are relative to `origin_s`, a `time.monotonic()` reading in
the parent. On Linux CLOCK_MONOTONIC is system-wide, so parent, children and
the load generator share one time axis. The origin can be set after the
children are up (`Fleet.set_origin`, sent over each child's stdin), so a
bench can start its timeline when the proxy is ready; until it is set, no
event is active.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import IO, Any, Literal

Distribution = Literal["constant", "exponential", "lognormal", "pareto"]
EventKind = Literal["slowdown", "stall", "fail", "flap", "crash", "bimodal"]

HEALTHZ_PATH = "/healthz"
BACKEND_HEADER = "x-backend-id"
LOAD_HEADER = "endpoint-load-metrics"
READY_TIMEOUT_S = 20.0
# Parent-death check period of a child; also bounds how late max_lifetime_s fires.
_WATCHDOG_PERIOD_S = 0.5


@dataclass(frozen=True)
class ServiceTime:
    """Service-time distribution with a given mean (milliseconds).

    `lognormal_sigma` is the sigma of the underlying normal; `pareto_alpha`
    the tail index (> 1 so the mean exists). Means are exact for every kind.
    """

    dist: Distribution = "exponential"
    mean_ms: float = 10.0
    lognormal_sigma: float = 1.0
    pareto_alpha: float = 2.5

    def __post_init__(self) -> None:
        if self.dist not in ("constant", "exponential", "lognormal", "pareto"):
            raise ValueError(f"unknown service-time distribution {self.dist!r}")
        if self.mean_ms < 0:
            raise ValueError(f"mean_ms must be >= 0, got {self.mean_ms}")
        if self.dist == "pareto" and self.pareto_alpha <= 1.0:
            raise ValueError(f"pareto_alpha must be > 1 for a finite mean, got {self.pareto_alpha}")

    def sample_ms(self, rng: random.Random) -> float:
        m = self.mean_ms
        if self.dist == "constant" or m == 0:
            return m
        if self.dist == "exponential":
            return rng.expovariate(1.0 / m)
        if self.dist == "lognormal":
            s = self.lognormal_sigma
            return rng.lognormvariate(math.log(m) - s * s / 2.0, s)
        a = self.pareto_alpha
        # Pareto with scale x_m has mean a*x_m/(a-1).
        return m * (a - 1.0) / a * rng.paretovariate(a)


@dataclass(frozen=True)
class Event:
    """One scripted change of behaviour between `start_s` and `end_s` (timeline seconds).

    - slowdown: service time x `factor`.
    - stall: requests (and /healthz) are held until `end_s`, then served.
    - fail: answer `status` at once (no service time) with `probability`.
    - flap: alternate healthy / failing-fast every `period_s` (failing in odd halves).
    - crash: the listener closes and every connection is reset; it listens
      again at `end_s` ("crash and restart").
    - bimodal: speed switches between 1x and `factor` at random intervals
      drawn uniformly from [`min_period_s`, `period_s`].
    """

    kind: EventKind
    start_s: float
    end_s: float
    factor: float = 1.0
    probability: float = 1.0
    status: int = 503
    period_s: float = 1.0
    min_period_s: float = 0.05

    def __post_init__(self) -> None:
        if self.kind not in ("slowdown", "stall", "fail", "flap", "crash", "bimodal"):
            raise ValueError(f"unknown event kind {self.kind!r}")
        if self.end_s < self.start_s:
            raise ValueError(f"event {self.kind}: end_s {self.end_s} before start_s {self.start_s}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"event {self.kind}: probability must be in [0, 1]")
        if self.period_s <= 0 or self.min_period_s <= 0 or self.min_period_s > self.period_s:
            raise ValueError(f"event {self.kind}: need 0 < min_period_s <= period_s")

    def active(self, t_s: float) -> bool:
        return self.start_s <= t_s < self.end_s

    @property
    def gray(self) -> bool:
        """Failures a shallow health check does not see (the backend still answers)."""
        return self.kind in ("slowdown", "fail", "flap", "bimodal")


@dataclass(frozen=True)
class SimBackend:
    id: str
    port: int
    host: str = "127.0.0.1"
    slots: int = 8
    service: ServiceTime = field(default_factory=ServiceTime)
    speed: float = 1.0  # service-time multiplier: 2.0 is twice as slow
    route_cost: dict[str, float] = field(default_factory=dict)  # path prefix -> multiplier
    events: tuple[Event, ...] = ()
    load_header: bool = False
    healthz_fails_during_gray: bool = False
    response_bytes: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"backend {self.id}: slots must be >= 1")
        if self.speed <= 0:
            raise ValueError(f"backend {self.id}: speed must be > 0")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def route_multiplier(self, path: str) -> float:
        """Cost multiplier of the longest matching path prefix (1.0 when none)."""
        best, best_len = 1.0, -1
        for prefix, mult in self.route_cost.items():
            if path.startswith(prefix) and len(prefix) > best_len:
                best, best_len = mult, len(prefix)
        return best

    def mean_service_ms(self, route_mix: dict[str, float] | None = None) -> float:
        """Expected service time, optionally averaged over a {path: weight} mix."""
        base = self.service.mean_ms * self.speed
        if not route_mix:
            return base * self.route_multiplier("/")
        total = sum(route_mix.values())
        return base * sum(w * self.route_multiplier(p) for p, w in route_mix.items()) / total

    def capacity_rps(self, route_mix: dict[str, float] | None = None) -> float:
        """Requests/s this backend sustains at 100% busy slots (no events)."""
        mean_ms = self.mean_service_ms(route_mix)
        return math.inf if mean_ms <= 0 else self.slots * 1000.0 / mean_ms

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimBackend:
        data = dict(data)
        data["service"] = ServiceTime(**data["service"])
        data["events"] = tuple(Event(**e) for e in data.get("events", ()))
        return cls(**data)


def fleet_capacity_rps(backends: Sequence[SimBackend],
                       route_mix: dict[str, float] | None = None) -> float:
    return sum(b.capacity_rps(route_mix) for b in backends)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports that were free a moment ago (the OS may reuse them later)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_accepts(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """Whether a server listens on host:port.

    A connect to an ephemeral-range port nobody listens on can "succeed" by
    connecting the socket to itself (TCP simultaneous open); that is not a server.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            return bool(sock.getsockname() != sock.getpeername())
    except OSError:
        return False


def demo_fleet(ports: Sequence[int]) -> list[SimBackend]:
    """A small heterogeneous fleet for `foretell demo`: the last backend is 3x slower.

    Backends report utilisation in `endpoint-load-metrics`; `/render` costs
    more than `/search` everywhere, and backend 1 is slow on `/render` only.
    """
    out = []
    for i, port in enumerate(ports):
        route_cost = {"/search": 0.5, "/render": 3.0 if i != 1 else 6.0}
        out.append(SimBackend(
            id=f"sim-{i}", port=port, slots=4,
            service=ServiceTime("lognormal", mean_ms=10.0, lognormal_sigma=0.5),
            speed=3.0 if i == len(ports) - 1 and len(ports) > 1 else 1.0,
            route_cost=route_cost, load_header=True, seed=i))
    return out


# ---------------------------------------------------------------------------
# The child process: one backend, one aiohttp server.

class Timeline:
    """Answers "what is going on at timeline second t" for one backend."""

    def __init__(self, events: Sequence[Event], rng: random.Random) -> None:
        self.events = tuple(events)
        self._rng = rng
        # Bimodal switch times, generated lazily and deterministically per seed.
        self._bimodal: dict[int, list[float]] = {}

    def _bimodal_slow(self, idx: int, ev: Event, t_s: float) -> bool:
        switches = self._bimodal.setdefault(idx, [ev.start_s])
        while switches[-1] <= t_s:
            switches.append(switches[-1] + self._rng.uniform(ev.min_period_s, ev.period_s))
        # Starts fast at start_s; every switch flips the phase.
        return bisect.bisect_right(switches, t_s) % 2 == 0

    def factor(self, t_s: float) -> float:
        f = 1.0
        for i, ev in enumerate(self.events):
            if not ev.active(t_s):
                continue
            if ev.kind == "slowdown" or (ev.kind == "bimodal" and self._bimodal_slow(i, ev, t_s)):
                f *= ev.factor
        return f

    def stall_until(self, t_s: float) -> float | None:
        ends = [ev.end_s for ev in self.events if ev.kind == "stall" and ev.active(t_s)]
        return max(ends) if ends else None

    def failing(self, t_s: float) -> Event | None:
        """The fail/flap event that makes `t_s` a failing instant, if any."""
        for ev in self.events:
            if not ev.active(t_s):
                continue
            if ev.kind == "fail":
                return ev
            if ev.kind == "flap" and int((t_s - ev.start_s) / ev.period_s) % 2 == 1:
                return ev
        return None

    def gray(self, t_s: float) -> bool:
        return any(ev.gray and ev.active(t_s) for ev in self.events)


class _Server:
    def __init__(self, spec: SimBackend, origin_s: float | None) -> None:
        from aiohttp import web

        self.spec = spec
        self.origin_s = origin_s
        self.rng = random.Random(spec.seed)
        self.timeline = Timeline(spec.events, random.Random(spec.seed + 7919))
        self.slots = asyncio.Semaphore(spec.slots)
        self.busy = 0
        self.crashed = False
        body = f"{spec.id} ".encode() + b"x" * spec.response_bytes
        self.body = body[: max(spec.response_bytes, 1)]
        self.runner: Any = None
        self._web = web
        self.site: Any = None

    def now_s(self) -> float:
        if self.origin_s is None:
            return -math.inf  # timeline not started: no event is active
        return time.monotonic() - self.origin_s

    def read_origins(self) -> None:
        """Thread body: each stdin line is a new timeline origin (time.monotonic())."""
        for line in sys.stdin:
            try:
                self.origin_s = float(line)
            except ValueError:
                continue

    def _headers(self) -> dict[str, str]:
        h = {BACKEND_HEADER: self.spec.id}
        if self.spec.load_header:
            h[LOAD_HEADER] = f"TEXT cpu_utilization={self.busy / self.spec.slots:.3f}"
        return h

    async def handle(self, request: Any) -> Any:
        web = self._web
        if self.crashed:
            return self._reset(request)
        if request.can_read_body:
            await request.read()
        t = self.now_s()
        stall_end = self.timeline.stall_until(t)
        if stall_end is not None:
            await asyncio.sleep(max(0.0, stall_end - t))
            t = self.now_s()
        if request.path == HEALTHZ_PATH:
            bad = self.spec.healthz_fails_during_gray and self.timeline.gray(t)
            return web.Response(status=503 if bad else 200, body=b"ok" if not bad else b"gray",
                                headers=self._headers())
        failing = self.timeline.failing(t)
        if failing is not None and self.rng.random() < failing.probability:
            return web.Response(status=failing.status, body=b"simulated failure",
                                headers=self._headers())
        cost_ms = (self.spec.service.sample_ms(self.rng) * self.spec.speed
                   * self.spec.route_multiplier(request.path))
        async with self.slots:
            # Service time starts when a worker slot is free, and the slowdown
            # factor is read then too, so queued requests see the current speed.
            self.busy += 1
            try:
                await asyncio.sleep(cost_ms * self.timeline.factor(self.now_s()) / 1000.0)
                # Utilisation as seen while this request still holds its slot.
                headers = self._headers()
            finally:
                self.busy -= 1
        if self.crashed:
            return self._reset(request)
        return web.Response(body=self.body, headers=headers)

    def _reset(self, request: Any) -> Any:
        """A crashed server answers nothing: reset the connection."""
        if request.transport is not None:
            request.transport.abort()
        return self._web.Response(status=500)

    async def listen(self) -> None:
        self.site = self._web.TCPSite(self.runner, self.spec.host, self.spec.port,
                                      reuse_address=True, backlog=1024)
        await self.site.start()

    async def crash(self) -> None:
        self.crashed = True
        if self.site is not None:
            await self.site.stop()
            self.site = None
        server = self.runner.server
        for handler in server.connections if server is not None else ():
            if handler.transport is not None:
                handler.transport.abort()

    async def restart(self) -> None:
        self.crashed = False
        await self.listen()

    async def run(self, max_lifetime_s: float | None, parent_pid: int) -> None:
        # The low-level server: no routing, every path lands in handle().
        self.runner = self._web.ServerRunner(self._web.Server(self.handle, access_log=None),
                                             handle_signals=False)
        await self.runner.setup()
        await self.listen()
        crashes = [ev for ev in self.spec.events if ev.kind == "crash"]
        crash_task = asyncio.create_task(self._crash_script(crashes))
        deadline = None if max_lifetime_s is None else time.monotonic() + max_lifetime_s
        try:
            while deadline is None or time.monotonic() < deadline:
                if os.getppid() != parent_pid:
                    return  # orphaned: the bench that started us is gone
                await asyncio.sleep(_WATCHDOG_PERIOD_S)
        finally:
            crash_task.cancel()
            await self.runner.cleanup()

    async def _crash_script(self, crashes: Sequence[Event]) -> None:
        # Polled rather than slept-until, so a later change of origin is honoured.
        if not crashes:
            return
        while True:
            t = self.now_s()
            down = any(ev.active(t) for ev in crashes)
            if down and not self.crashed:
                await self.crash()
            elif not down and self.crashed:
                await self.restart()
            await asyncio.sleep(0.005)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


def _child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--spec", required=True, help="SimBackend as JSON")
    parser.add_argument("--origin-s", type=float, default=None,
                        help="timeline origin, a time.monotonic() reading (else read from stdin)")
    parser.add_argument("--max-lifetime-s", type=float, default=None)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    spec = SimBackend.from_json(json.loads(args.spec))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = _Server(spec, args.origin_s)
    threading.Thread(target=server.read_origins, daemon=True).start()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(server.run(args.max_lifetime_s, args.parent_pid))
    return 0


# ---------------------------------------------------------------------------
# The parent side.

class FleetError(RuntimeError):
    pass


class Fleet:
    """Start backends as child processes; a context manager.

    `start()` returns once every port accepts TCP connections. `stop()`
    terminates children by PID (SIGTERM, then SIGKILL). `kill(id)` and
    `restart(id)` let a bench crash a backend from outside.
    """

    def __init__(self, backends: Sequence[SimBackend], *, max_lifetime_s: float | None = 3600,
                 seed: int = 0, origin_s: float | None = None) -> None:
        ids = [b.id for b in backends]
        if len(set(ids)) != len(ids):
            raise FleetError(f"backend ids must be unique: {ids}")
        ports = [b.port for b in backends]
        if len(set(ports)) != len(ports):
            raise FleetError(f"backend ports must be unique: {ports}")
        # The fleet seed shifts every backend's own seed, so one number reseeds a run.
        self.backends = [SimBackend.from_json({**b.to_json(), "seed": b.seed + seed * 1_000_003})
                         for b in backends]
        self.max_lifetime_s = max_lifetime_s
        self.origin_s = origin_s
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __iter__(self) -> Iterator[SimBackend]:
        return iter(self.backends)

    @property
    def pids(self) -> dict[str, int]:
        return {bid: p.pid for bid, p in self._procs.items()}

    def _spawn(self, spec: SimBackend) -> subprocess.Popen[bytes]:
        # Readiness is "the port accepts": a port another process already listens on
        # would pass for this backend (and its bind fail unseen).
        if port_accepts(spec.host, spec.port):
            raise FleetError(f"backend {spec.id}: {spec.host}:{spec.port} is already in use "
                             f"by another process")
        cmd = [sys.executable, "-m", "bench.fleet", "--spec", json.dumps(spec.to_json()),
               "--parent-pid", str(os.getpid())]
        if self.origin_s is not None:
            cmd += ["--origin-s", repr(self.origin_s)]
        if self.max_lifetime_s is not None:
            cmd += ["--max-lifetime-s", repr(self.max_lifetime_s)]
        env = dict(os.environ)
        # Make `bench` importable in the child whatever the caller's cwd is.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # stderr goes to a file, not a pipe: an unread pipe would fill and block the child.
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=log)
        self._logs[spec.id] = log
        return proc

    def stderr_of(self, backend_id: str) -> str:
        """What a backend wrote to stderr so far (for error messages)."""
        log = self._logs.get(backend_id)
        if log is None:
            return ""
        log.seek(0)
        return log.read().decode(errors="replace")

    def start(self, timeout_s: float = READY_TIMEOUT_S, *, defer_origin: bool = False) -> None:
        """Spawn every backend and wait until all accept.

        Without an origin given to the constructor, the timeline starts when
        all are ready, or, with `defer_origin`, at a later `set_origin()`.
        """
        if self._procs:
            raise FleetError("fleet already started")
        try:
            for spec in self.backends:
                self._procs[spec.id] = self._spawn(spec)
            self._wait_ready(self.backends, timeout_s)
            if self.origin_s is None and not defer_origin:
                self.set_origin(time.monotonic())
        except BaseException:
            self.stop()
            raise

    def set_origin(self, origin_s: float) -> None:
        """Start (or move) every backend's event timeline at `origin_s` (time.monotonic())."""
        self.origin_s = origin_s
        for proc in self._procs.values():
            self._send_origin(proc)

    def _send_origin(self, proc: subprocess.Popen[bytes]) -> None:
        if self.origin_s is None or proc.stdin is None or proc.poll() is not None:
            return
        try:
            proc.stdin.write(f"{self.origin_s!r}\n".encode())
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone; stop() will reap it

    def _wait_ready(self, specs: Sequence[SimBackend], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(specs)
        while pending:
            spec = pending[0]
            proc = self._procs[spec.id]
            if proc.poll() is not None:
                err = self.stderr_of(spec.id)
                raise FleetError(
                    f"backend {spec.id} exited with {proc.returncode} at start:\n{err[-2000:]}")
            if port_accepts(spec.host, spec.port):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise FleetError(f"backend {spec.id} did not accept on {spec.host}:{spec.port} "
                                 f"within {timeout_s:.0f} s")
            time.sleep(0.02)

    def kill(self, backend_id: str) -> None:
        """Crash one backend now (SIGKILL), as a real process crash."""
        proc = self._procs[backend_id]
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)

    def restart(self, backend_id: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start a killed backend again on the same port and timeline."""
        spec = next(b for b in self.backends if b.id == backend_id)
        proc = self._procs[backend_id]
        if proc.poll() is None:
            raise FleetError(f"backend {backend_id} is still running; kill it first")
        self._procs[backend_id] = self._spawn(spec)
        self._wait_ready([spec], timeout_s)
        self._send_origin(self._procs[backend_id])

    def alive(self, backend_id: str) -> bool:
        return self._procs[backend_id].poll() is None

    def stop(self) -> None:
        procs = list(self._procs.values())
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5.0
        for p in procs:
            try:
                p.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self._procs.clear()
        for log in self._logs.values():
            log.close()
        self._logs.clear()


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
