"""Next-interval load forecast and a replica recommendation, as Prometheus gauges.

    Load(t) = a + b * Requests(t-1) + c * Requests(t-2)

counted in requests per interval of `forecast.interval_s`. The proxy calls
`on_request()` per request; a background task closes an interval every
`interval_s`, computes the forecast and sets

    foretell_forecast_requests_per_second   forecast / interval_s
    foretell_recommended_replicas           ceil(forecast rps / capacity_rps_per_replica),
                                            within [min_replicas, max_replicas]

which a Kubernetes autoscaler (e.g. KEDA or the Prometheus adapter) can read.

Coefficients come from `foretell train forecast` as JSON:

    {"format": "foretell-forecast", "version": 1, "interval_s": 10.0,
     "a": 3.2, "b": 0.7, "c": 0.25, ...metrics...}

and their interval must equal the config's. Without a file the forecast is
the last interval's count (a=0, b=1, c=0). With `counts_path` set, every
closed interval is appended as `interval_end_s,requests` (training data).

Intervals end on wall-clock multiples of `interval_s`, in every worker alike.
Several workers: each counts its own requests and forecasts its own share
(the model is linear, so the intercept is split across them); the rate
gauge is a `livesum`, the fleet's rate. The replica gauge must come from
that sum, not from any one worker (a few keep-alive clients can load one
worker far more than another), so /metrics replaces the workers' values
with one computed from the summed rate (proxy/admin.py, `fleet_replicas`).
Each worker appends its own line per interval to `counts_path`, with the
same `interval_end_s`; `foretell train forecast` sums the lines of an
interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

from proxy.config import Forecast

log = logging.getLogger("foretell.forecast")

FORMAT_NAME = "foretell-forecast"
FORMAT_VERSION = 1

FORECAST_RPS_NAME = "foretell_forecast_requests_per_second"
REPLICAS_NAME = "foretell_recommended_replicas"
REPLICAS_HELP = "Replicas needed for the forecast rate at the configured per-replica capacity"
FORECAST_RPS = Gauge(FORECAST_RPS_NAME, "Forecast request rate for the next interval",
                     multiprocess_mode="livesum")
# With several workers /metrics replaces this gauge with one computed from the summed
# rate (proxy/admin.py, fleet_replicas); the mode only decides what a scraper of the
# worker files without that wrapper would see.
REPLICAS = Gauge(REPLICAS_NAME, REPLICAS_HELP, multiprocess_mode="livemax")


def recommended_replicas(rps: float, config: Forecast) -> int:
    """Replicas for a request rate: ceil(rps / capacity), within [min, max]."""
    need = math.ceil(rps / config.capacity_rps_per_replica - 1e-9)
    return min(max(need, config.min_replicas), config.max_replicas)


class ForecastError(Exception):
    """A coefficients file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Coefficients:
    a: float
    b: float
    c: float
    interval_s: float
    metrics: dict[str, Any] | None = None

    def predict(self, r1: float, r2: float) -> float:
        return self.a + self.b * r1 + self.c * r2

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "interval_s": self.interval_s,
                "a": self.a, "b": self.b, "c": self.c, **(self.metrics or {})}


PERSISTENCE = Coefficients(0.0, 1.0, 0.0, 0.0)


def load_coefficients(path: str | Path) -> Coefficients:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ForecastError(f"{path}: no such coefficients file "
                            "(create it with `foretell train forecast`)") from None
    except OSError as exc:
        raise ForecastError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ForecastError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ForecastError(f"{path}: not a forecast coefficients file "
                            f"(expected \"format\": \"{FORMAT_NAME}\")")
    if data.get("version") != FORMAT_VERSION:
        raise ForecastError(f"{path}: version {data.get('version')!r}, expected {FORMAT_VERSION}")
    values = {}
    for key in ("a", "b", "c", "interval_s"):
        v = data.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ForecastError(f"{path}: {key!r} must be a finite number, got {v!r}")
        values[key] = float(v)
    if values["interval_s"] <= 0:
        raise ForecastError(f"{path}: 'interval_s' must be positive")
    extra = {k: v for k, v in data.items() if k not in ("format", "version", *values)}
    return Coefficients(values["a"], values["b"], values["c"], values["interval_s"], extra)


def coefficients_for(config: Forecast) -> Coefficients:
    """The coefficients `config` asks for: its file's, fitted for its interval, or persistence."""
    if config.coefficients_path is None:
        return Coefficients(0.0, 1.0, 0.0, config.interval_s)
    coef = load_coefficients(config.coefficients_path)
    if not math.isclose(coef.interval_s, config.interval_s, rel_tol=1e-6):
        raise ForecastError(
            f"{config.coefficients_path}: fitted for {coef.interval_s:g} s intervals "
            f"but forecast.interval_s is {config.interval_s:g}")
    return coef


class LoadForecaster:
    """Counts requests per interval and publishes the forecast and the replica count."""

    def __init__(self, config: Forecast, *, workers: int = 1,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.workers = max(1, workers)
        self._wall = wall
        self.coefficients = coefficients_for(config)
        self.count = 0
        self.history: list[int] = [0, 0]  # requests in t-1, t-2
        self.intervals = 0
        self.forecast_rps = 0.0
        self.replicas = config.min_replicas
        self._task: asyncio.Task[None] | None = None

    def on_request(self) -> None:
        self.count += 1

    def close_interval(self, end_s: float | None = None) -> None:
        """End the current interval (at wall time `end_s`, default now): shift history,
        update the forecast and the gauges."""
        n, self.count = self.count, 0
        self.history = [n, self.history[0]]
        self.intervals += 1
        c = self.coefficients
        # The intercept is the whole fleet's; each worker publishes its share.
        requests = (c.a / self.workers) + c.b * self.history[0] + c.c * self.history[1]
        self.forecast_rps = max(0.0, requests / self.config.interval_s)
        # This worker's view (exact with one worker); /metrics recomputes it from the sum.
        self.replicas = recommended_replicas(self.forecast_rps * self.workers, self.config)
        FORECAST_RPS.set(self.forecast_rps)
        REPLICAS.set(self.replicas)
        if self.config.counts_path is not None:
            end_s = self._wall() if end_s is None else end_s
            try:
                with open(self.config.counts_path, "a") as f:
                    f.write(f"{end_s:.3f},{n}\n")
            except OSError as exc:
                log.error("forecast: cannot append to %s: %s", self.config.counts_path, exc)

    def _next_end_s(self) -> float:
        """The next wall-clock multiple of the interval: every worker's lines for one
        interval carry the same end time (a process's first interval is a partial one)."""
        interval = self.config.interval_s
        return (math.floor(self._wall() / interval) + 1) * interval

    async def _run(self) -> None:
        end_s = self._next_end_s()
        while True:
            await asyncio.sleep(max(0.0, end_s - self._wall()))
            if self._wall() < end_s:
                # Before the boundary (the loop's timer and the wall clock disagree, or the
                # clock was set back): wait again, for a nearer boundary if it moved back
                # by more than an interval.
                end_s = min(end_s, self._next_end_s())
                continue
            self.close_interval(end_s)
            end_s = self._next_end_s()  # skips boundaries the clock jumped over

    async def start(self) -> None:
        if self.config.enabled and self._task is None:
            REPLICAS.set(self.replicas)
            self._task = asyncio.create_task(self._run(), name="foretell-forecast")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
