"""Benchmark scenarios, declared as data.

A scenario is a fleet template (backends with port 0; the runner assigns
ports), a route mix, the utilisations to run at, a time budget, and how
many proxies stand in front of the fleet. The request rate is
`utilisation x effective capacity`, where capacity is what the fleet serves
with every slot busy (`SimBackend.capacity_rps` over the route mix), divided
by `mean_slowdown` for scenarios whose backends are slower on average than
their nominal speed (bimodal).

The base fleet: 8 backends, 2 worker slots each, lognormal service times
with a 40 ms mean: 400 requests/s at 100%, small enough for the load
generator, the proxy and the fleet to share 2 cores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from bench.fleet import Event, ServiceTime, SimBackend, fleet_capacity_rps
from bench.loadgen import RouteMix

N_BACKENDS = 8
SLOTS = 2
BASE_SERVICE = ServiceTime("lognormal", mean_ms=40.0, lognormal_sigma=0.5)
LONG_S = 10_000.0  # "until the end of the run" for events


@dataclass(frozen=True)
class Scenario:
    name: str
    code: str
    description: str
    backends: tuple[SimBackend, ...]
    routes: tuple[RouteMix, ...] = (RouteMix("/api", 1.0),)
    utilisations: tuple[float, ...] = (0.5, 0.7, 0.9)
    quick_utilisations: tuple[float, ...] = (0.7,)
    duration_s: float = 30.0
    quick_duration_s: float = 12.0
    warmup_s: float = 3.0
    deadline_s: float = 2.0
    # Piecewise-linear rate multiplier over time ((t_s, multiplier), ...), with times
    # for a run of `duration_s`; a shorter (quick) run is squeezed to the same shape.
    rate_profile: tuple[tuple[float, float], ...] = ()
    mean_slowdown: float = 1.0
    proxies: int = 1

    def route_mix(self) -> dict[str, float]:
        return {r.path: r.weight for r in self.routes}

    def capacity_rps(self) -> float:
        return fleet_capacity_rps(self.backends, self.route_mix()) / self.mean_slowdown

    def rate_rps(self, utilisation: float) -> float:
        return utilisation * self.capacity_rps()

    def events(self) -> list[tuple[str, Event]]:
        """(backend id, event) for every scripted event, for plot markers."""
        return [(b.id, ev) for b in self.backends for ev in b.events]

    def fleet(self, ports: Sequence[int], seed: int) -> list[SimBackend]:
        """The concrete fleet: template backends on `ports`, seeds offset by `seed`."""
        if len(ports) != len(self.backends):
            raise ValueError(f"{self.name}: need {len(self.backends)} ports, got {len(ports)}")
        return [dataclasses.replace(b, port=p, seed=b.seed + 1000 * seed)
                for b, p in zip(self.backends, ports, strict=True)]


def _fleet(n: int = N_BACKENDS, **overrides: object) -> list[SimBackend]:
    return [SimBackend(id=f"b{i}", port=0, slots=SLOTS, service=BASE_SERVICE, load_header=True,
                       seed=i, **overrides) for i in range(n)]  # type: ignore[arg-type]


def _with(backends: list[SimBackend], index: int, **changes: object) -> None:
    backends[index] = dataclasses.replace(backends[index], **changes)  # type: ignore[arg-type]


def _homogeneous() -> Scenario:
    return Scenario("homogeneous", "S0", "8 identical backends", tuple(_fleet()))


def _skew() -> Scenario:
    fleet = _fleet()
    for i in (6, 7):
        _with(fleet, i, speed=4.0)
    return Scenario("skew", "S1", "2 of 8 backends 4x slower", tuple(fleet))


def _bimodal() -> Scenario:
    fleet = [dataclasses.replace(b, events=(Event("bimodal", 0.0, LONG_S, factor=3.0,
                                                  min_period_s=0.05, period_s=0.5),))
             for b in _fleet()]
    # Half the time at 1x, half at 3x: on average 2x the nominal service time.
    return Scenario("bimodal", "S2", "every backend switches between 1x and 3x every 50-500 ms",
                    tuple(fleet), mean_slowdown=2.0)


def _stall() -> Scenario:
    fleet = _fleet()
    _with(fleet, 0, events=(Event("stall", 6.0, 10.0),))
    return Scenario("stall", "S3", "backend b0 stalls (answers nothing) from 6 s to 10 s",
                    tuple(fleet), duration_s=30.0, quick_duration_s=14.0)


def _ramp() -> Scenario:
    return Scenario("ramp", "S4", "load ramps linearly from 0.5x to 1.3x capacity",
                    tuple(_fleet()), utilisations=(1.0,), quick_utilisations=(1.0,),
                    rate_profile=((0.0, 0.5), (30.0, 1.3)), duration_s=30.0,
                    quick_duration_s=16.0, warmup_s=2.0)


def _gray() -> Scenario:
    fleet = _fleet()
    _with(fleet, 0, events=(Event("fail", 3.0, LONG_S, probability=1.0, status=503),))
    _with(fleet, 1, events=(Event("slowdown", 3.0, LONG_S, factor=5.0),))
    _with(fleet, 2, events=(Event("flap", 3.0, LONG_S, period_s=2.0),))
    # Utilisation is of the nominal fleet; the gray backends take ~2.3 of 8 away.
    return Scenario("gray", "S5",
                    "from 3 s: b0 answers 503 fast, b1 is 5x slower but 200, b2 flaps every 2 s",
                    tuple(fleet), utilisations=(0.4, 0.55, 0.7), quick_utilisations=(0.55,))


def _request_aware() -> Scenario:
    fleet = _fleet()
    for i in range(N_BACKENDS):
        # Half the fleet is fast at /search and slow at /render, the other half the reverse.
        cost = {"/search": 0.5, "/render": 4.0} if i % 2 == 0 else {"/search": 2.0, "/render": 1.0}
        _with(fleet, i, route_cost=cost)
    routes = (RouteMix("/search", 0.6), RouteMix("/render", 0.3), RouteMix("/api", 0.1))
    return Scenario("request_aware", "S6",
                    "even backends: /search 0.5x, /render 4x; odd: /search 2x, /render 1x",
                    tuple(fleet), routes=routes)


def _two_proxies() -> Scenario:
    fleet = _fleet()
    _with(fleet, 7, speed=3.0)
    return Scenario("two_proxies", "S7",
                    "two proxy processes share the fleet (b7 3x slower): herding shows up here",
                    tuple(fleet), proxies=2)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    _homogeneous(), _skew(), _bimodal(), _stall(), _ramp(), _gray(), _request_aware(),
    _two_proxies())}


def get(name: str) -> Scenario:
    """A scenario by name (`skew`) or code (`S1`)."""
    for s in SCENARIOS.values():
        if name in (s.name, s.code, s.code.lower()):
            return s
    raise KeyError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")


def select(spec: str) -> list[Scenario]:
    """`all` or a comma-separated list of names/codes."""
    if spec == "all":
        return list(SCENARIOS.values())
    return [get(n.strip()) for n in spec.split(",") if n.strip()]
