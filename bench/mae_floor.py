"""The lowest validation MAE any latency model can reach on a bench run's telemetry.

    foretell bench mae-floor --scenario homogeneous --data tel/homogeneous [--model M.onnx]

Every latency the bench fleet produces contains the request's own service
time S, drawn by the backend (bench/fleet.py `ServiceTime`) when the request
gets a slot, independently of anything the proxy knows when it decides. For
any prediction c made at decision time, E|wait + S - c| >= E|S - median(S)|
(condition on the wait, the event factor and the proxy's own overhead, none of
which depends on this request's S), so no
model's mean absolute error can be below the mean, over the validation rows,
of that row's service-time deviation around its median. Scripted events
(slowdowns, bimodal 3x) only multiply S by factors >= 1, so the nominal
service time of the row's backend and route gives a lower bound; the true
floor is higher wherever events or queueing add noise of their own. Two
small caveats, as in the trainer: failed attempts (timeouts included) are
left out and targets are clipped at the training part's 99.9th percentile,
which trims the slowest draws of S from a few rows (~0.1-0.2%).

Printed for the same rows and split as `foretell train latency` (the last
`--validation-fraction` of successful decisions): the floor, the causal
per-backend EWMA's MAE (the trainer's accuracy gate), their ratio (the lowest
"MAE / EWMA" any model can show on these rows), and with `--model` that
model's MAE, its ratio, and the share of the reachable gap (EWMA - floor) it
closes. To score a model on telemetry it was neither trained nor picked on
(the trainer picks among its candidates on the validation rows), collect
more runs with other seeds and pass `--validation-fraction 0.8`.

Also printed, as an empirical check rather than a bound: the noise on
requests sent to a backend with nothing in flight (no queueing to predict),
as the mean absolute deviation around the median latency of each backend and
route over all such rows (in-sample, so optimistic). Above the floor, it
shows how much the machine (event-loop lag of the proxy, the load generator
and the fleet sharing its cores) adds to every latency.

Also printed, as an ESTIMATE and not a bound: the queueing-aware floor, the
lowest MAE of a predictor that knows the row's backend, route class, event
factor and the backend's inflight at decision time (the row's `inflight`
feature), but not how far along the requests in flight are. Per row it is the
mean absolute deviation around its median of wait + S, by Monte Carlo of the
fleet's own backend (`slots` workers, FIFO: asyncio.Semaphore; S drawn by
`ServiceTime.sample_ms`) holding `inflight` other requests. Its assumptions:
- the proxy's inflight is everything at the backend (false with two proxies:
  each sees only its own, so there the estimate is optimistic);
- the min(inflight, slots) requests in service are at a random point of their
  service (equilibrium residual: length-biased S, uniform position), the rest
  wait ahead in FIFO order with fresh draws of S; requests in flight are of
  the scenario's route mix (the policy's steering of routes ignored);
- the event factor is the scripted one at the row's timeline second (the run
  starts at its first decision: the load generator starts at the timeline
  origin) and holds for every request involved; slowdowns are exact, a
  bimodal backend is taken at each phase half the time with the phase known
  (its switches are random: see `Timeline`), stalls are ignored;
- network, proxy and machine time are noise-free (the idle-backend line shows
  they are not), and, as above, failed rows are left out.
So it is not a bound, and it can sit on either side of the true floor; it
says how much of the gap between the EWMA and the service-noise floor is
queueing that no inflight-only model can remove.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from bench.fleet import ServiceTime, SimBackend, Timeline
from bench.runner import route_class_name
from bench.scenarios import Scenario, get
from policies.features import INFLIGHT, OTHER_SLOT, ROUTE0, ROUTE_SLOTS, RouteSlots

MAD_SAMPLES = 400_000
# Monte Carlo draws per queueing cell: the estimate's sampling error is ~0.3%.
QUEUE_SAMPLES = 100_000
QUEUE_SEED = 0


@cache
def service_draws_ms(service: ServiceTime) -> np.ndarray:
    """MAD_SAMPLES draws of the fleet's own sampler (seed 0), shared by both figures."""
    rng = random.Random(0)
    s = np.fromiter((service.sample_ms(rng) for _ in range(MAD_SAMPLES)), dtype=np.float64,
                    count=MAD_SAMPLES)
    s.flags.writeable = False  # cached: shared by every caller
    return s


@cache
def mad_factor(service: ServiceTime) -> float:
    """E|S - median(S)| / E[S], by sampling the fleet's own sampler (scale-free).

    Lognormal with sigma 0.5: erf(0.5 / sqrt 2) = 0.383.
    """
    s = service_draws_ms(service)
    mean = float(s.mean())
    return 0.0 if mean <= 0 else float(np.mean(np.abs(s - np.median(s)))) / mean


def slot_paths(scenario: Scenario, route_classes: Sequence[str]) -> list[list[str]]:
    """The request paths behind each route slot of the telemetry, slotted by the proxy's own
    RouteSlots. The last slot also takes any unknown class, so it stands for every route
    and the floor takes the cheapest of its paths."""
    by_name = {route_class_name(r.path): r.path for r in scenario.routes}
    only = scenario.routes[0].path if len(scenario.routes) == 1 else None
    slots = RouteSlots(route_classes)
    paths: list[list[str]] = [[] for _ in range(ROUTE_SLOTS)]
    for name in slots.classes:
        path = by_name.get(name, only)
        if path is None and name != "other":
            raise ValueError(f"route class {name!r} of the telemetry is not a route of scenario "
                             f"{scenario.name} ({', '.join(by_name)})")
        paths[slots.slot(name)].append(path or "/")
    paths[OTHER_SLOT] = sorted({*paths[OTHER_SLOT], *(r.path for r in scenario.routes)})
    return paths


def route_slot(x: np.ndarray) -> np.ndarray:
    return np.argmax(x[:, ROUTE0:ROUTE0 + ROUTE_SLOTS], axis=1)


def idle_noise_ms(backend_ids: np.ndarray, x: np.ndarray, y_ms: np.ndarray) -> tuple[int, float]:
    """(rows, mean |y - median|) over rows decided with nothing in flight at the backend,
    the median taken per backend and route slot."""
    idle = x[:, INFLIGHT] == 0
    slot = route_slot(x)
    total, rows = 0.0, 0
    for b in np.unique(backend_ids[idle]):
        for s in np.unique(slot[idle]):
            y = y_ms[idle & (backend_ids == b) & (slot == s)]
            if len(y):
                total += float(np.sum(np.abs(y - np.median(y))))
                rows += len(y)
    return rows, (total / rows if rows else float("nan"))


def row_backends(scenario: Scenario, backend_ids: np.ndarray, x: np.ndarray,
                 route_classes: Sequence[str]) -> tuple[list[SimBackend], np.ndarray]:
    """Per row: the scenario's backend, and the mean service time in ms of the cheapest
    path the row's route slot may stand for (a lower bound when a slot stands for several)."""
    specs: dict[str, SimBackend] = {b.id: b for b in scenario.backends}
    paths = slot_paths(scenario, route_classes)
    rows: list[SimBackend] = []
    mean_ms = np.empty(len(x), dtype=np.float64)
    for i, (raw_id, s) in enumerate(zip(backend_ids, route_slot(x), strict=True)):
        bid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        spec = specs.get(bid)
        if spec is None:
            raise ValueError(f"backend {bid!r} of the telemetry is not in scenario {scenario.name} "
                             f"({', '.join(specs)}): telemetry from another scenario?")
        rows.append(spec)
        mean_ms[i] = min(spec.mean_service_ms({path: 1.0}) for path in paths[s] or paths[-1])
    return rows, mean_ms


def floor_ms(scenario: Scenario, backend_ids: np.ndarray, x: np.ndarray,
             route_classes: Sequence[str]) -> np.ndarray:
    """Per row: the nominal service time's mean absolute deviation around its median."""
    specs, mean_ms = row_backends(scenario, backend_ids, x, route_classes)
    return np.array([mad_factor(spec.service) for spec in specs]) * mean_ms


Mix = tuple[tuple[float, float], ...]  # ((service-time multiplier, weight), ...)


@cache
def queue_cell(service: ServiceTime, slots: int, own: float, others: Mix,
               inflight: int) -> tuple[float, float]:
    """(median, mean |L - median|) of the latency L = wait + S of a request sent to a
    backend of `slots` FIFO workers holding `inflight` other requests, in units of the
    service's sample mean. `own` is this request's service-time multiplier, `others`
    the mix of the requests in flight. The first min(inflight, slots) are in service,
    each with an equilibrium residual (the request in a busy slot at a random instant:
    drawn in proportion to its length, at a uniform point of it); the rest queue ahead.
    Deterministic: one seed for every cell, so cells differing only in inflight share
    their draws (the estimate grows with inflight draw by draw, not only on average)."""
    s = service_draws_ms(service)
    mean = float(s.mean())
    if mean <= 0:
        return 0.0, 0.0
    unit = s / mean
    rng = np.random.default_rng(QUEUE_SEED)
    n = QUEUE_SAMPLES
    latency = own * unit[rng.integers(len(unit), size=n)]
    mult = np.array([m for m, _ in others], dtype=np.float64)
    weight = np.array([w for _, w in others], dtype=np.float64)
    busy = min(inflight, slots)
    free = np.zeros((n, slots))  # time until each worker is free for the next in line
    if busy:
        # A busy slot is more likely to hold a long request: length-biased in route and S.
        m = rng.choice(mult, size=(n, busy), p=mult * weight / np.sum(mult * weight))
        cum = np.cumsum(unit)
        s_biased = unit[np.minimum(np.searchsorted(cum, rng.random((n, busy)) * cum[-1]),
                                   len(unit) - 1)]
        free[:, :busy] = m * s_biased * rng.random((n, busy))
    rows = np.arange(n)
    for _ in range(inflight - busy):
        # FIFO: the first in line takes the first worker to free up.
        j = np.argmin(free, axis=1)
        free[rows, j] += (rng.choice(mult, size=n, p=weight / weight.sum())
                          * unit[rng.integers(len(unit), size=n)])
    latency += free.min(axis=1)
    median = float(np.median(latency))
    return median, float(np.mean(np.abs(latency - median)))


def timeline_s(run_starts_s: Sequence[float], rows_s: np.ndarray) -> np.ndarray:
    """Each row's second on its run's event timeline: since the start of the run it falls
    in (`Telemetry.spans`: a proxy process's first decision; the load generator starts at
    the timeline origin)."""
    starts = np.sort(np.asarray(run_starts_s, dtype=np.float64))
    run = np.maximum(np.searchsorted(starts, rows_s, side="right") - 1, 0)
    out: np.ndarray = rows_s - starts[run]
    return out


def factor_mix(spec: SimBackend, t_s: float) -> Mix:
    """((event factor, probability), ...) at timeline second t_s. Scripted slowdowns are
    read from the fleet's own `Timeline`; a bimodal event's phase is random (switch
    times drawn by the backend), so each of its two speeds counts half."""
    fixed = [ev for ev in spec.events if ev.kind != "bimodal"]
    base = Timeline(fixed, random.Random(0)).factor(t_s)
    mix: Mix = ((base, 1.0),)
    for ev in spec.events:
        if ev.kind == "bimodal" and ev.active(t_s):
            mix = tuple((f * g, w * 0.5) for f, w in mix for g in (1.0, ev.factor))
    return mix


def queue_estimate_ms(scenario: Scenario, backend_ids: np.ndarray, x: np.ndarray,
                      route_classes: Sequence[str], t_s: np.ndarray) -> np.ndarray:
    """Per row: the queueing-aware estimate (see the module docstring; not a bound)."""
    specs, own_ms = row_backends(scenario, backend_ids, x, route_classes)
    route_mix = scenario.route_mix()
    inflight = x[:, INFLIGHT].astype(np.int64)
    out = np.empty(len(x), dtype=np.float64)
    for i, spec in enumerate(specs):
        base_ms = spec.service.mean_ms
        if base_ms <= 0:
            out[i] = 0.0
            continue
        others = tuple(sorted((spec.mean_service_ms({p: 1.0}) / base_ms, w)
                              for p, w in route_mix.items()))
        mad = queue_cell(spec.service, spec.slots, own_ms[i] / base_ms, others, int(inflight[i]))[1]
        out[i] = sum(w * f for f, w in factor_mix(spec, float(t_s[i]))) * mad * base_ms
    return out


@dataclass
class FloorReport:
    rows: int
    floor_ms: float
    ewma_ms: float
    model_ms: float | None
    idle_rows: int
    idle_ms: float
    queue_ms: float | None = None

    def lines(self) -> list[str]:
        out = [f"validation rows              {self.rows}",
               f"service-noise floor (MAE)    {self.floor_ms:8.3f} ms",
               f"causal EWMA predictor (MAE)  {self.ewma_ms:8.3f} ms",
               f"lowest reachable ratio       {self.floor_ms / self.ewma_ms:8.2f}x the EWMA's",
               f"idle-backend noise (MAE)     {self.idle_ms:8.3f} ms = "
               f"{self.idle_ms / self.ewma_ms:.2f}x the EWMA's ({self.idle_rows} rows with nothing "
               "in flight, all of the telemetry; in-sample, not a bound)"]
        if self.queue_ms is not None:
            out += [f"queueing-aware ESTIMATE      {self.queue_ms:8.3f} ms = "
                    f"{self.queue_ms / self.ewma_ms:.2f}x the EWMA's (an estimate, not a bound: "
                    "knows backend, route, event factor and inflight, not the ages in flight; "
                    "FIFO slots, equilibrium residuals, one proxy; see the docstring)"]
        if self.model_ms is not None:
            gap = self.ewma_ms - self.floor_ms
            closed = (self.ewma_ms - self.model_ms) / gap if gap > 0 else float("nan")
            out += [f"model (MAE)                  {self.model_ms:8.3f} ms",
                    f"model ratio                  {self.model_ms / self.ewma_ms:8.2f}x the EWMA's",
                    f"reachable gap closed         {closed:8.1%}"]
            if self.queue_ms is not None:
                q_gap = self.ewma_ms - self.queue_ms
                q_closed = (self.ewma_ms - self.model_ms) / q_gap if q_gap > 0 else float("nan")
                out.append(f"gap closed to the ESTIMATE   {q_closed:8.1%}")
        return out


def measure(scenario: Scenario, data_dir: str, *, validation_fraction: float = 0.2,
            max_rows: int | None = None, skip_other_schemas: bool = False,
            model_path: str | None = None) -> FloorReport:
    from train.dataset import load_telemetry
    from train.latency import MAX_ROWS, baselines, mae, prepare

    data = load_telemetry(data_dir, skip_other_schemas=skip_other_schemas)
    p = prepare(data, validation_fraction=validation_fraction,
                max_rows=MAX_ROWS if max_rows is None else max_rows)
    s = p.split
    _, _, ewma_mae = baselines(p)
    floor = floor_ms(scenario, p.backend[s:], p.x[s:], data.route_classes)
    t_s = timeline_s([start for start, _ in data.spans] or [float(p.time_s[0])], p.time_s[s:])
    queue = queue_estimate_ms(scenario, p.backend[s:], p.x[s:], data.route_classes, t_s)
    model_mae = None
    if model_path is not None:
        from train.evaluate import onnx_predictor

        predict, _ = onnx_predictor(model_path)
        model_mae = mae(predict(p.x[s:]), p.y_ms[s:])
    idle_rows, idle_ms = idle_noise_ms(p.backend, p.x, p.y_ms)
    return FloorReport(len(p.y_ms) - s, float(floor.mean()), ewma_mae, model_mae, idle_rows, idle_ms,
                       float(queue.mean()))


def add_parser(sub: Any) -> None:
    """Register `foretell bench mae-floor` on bench/cli.py's sub-parsers."""
    p = sub.add_parser("mae-floor", help="the lowest model MAE reachable on a run's telemetry "
                                         "(service-time noise), beside the EWMA's, and a "
                                         "queueing-aware estimate (not a bound)")
    p.add_argument("--scenario", required=True, help="the scenario the telemetry was collected on")
    p.add_argument("--data", required=True, help="telemetry directory (as for foretell train)")
    p.add_argument("--model", default=None, help="also score this model file")
    p.add_argument("--validation-fraction", type=float, default=0.2,
                   help="score the last this share of rows (as the trainer); on telemetry the model "
                        "never saw, 0.8: the EWMA's alpha is tuned on the first 20%%")
    p.add_argument("--max-rows", type=int, default=None,
                   help="as for foretell train latency (default: the trainer's)")
    p.add_argument("--skip-other-schemas", action="store_true")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from policies.onnx_latency import ModelError
    from train.dataset import DatasetError
    from train.latency import TrainError

    try:
        report = measure(get(args.scenario), args.data, validation_fraction=args.validation_fraction,
                         max_rows=args.max_rows, skip_other_schemas=args.skip_other_schemas,
                         model_path=args.model)
    except (KeyError, ValueError, DatasetError, TrainError, ModelError) as exc:
        print(f"foretell bench mae-floor: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return 0
