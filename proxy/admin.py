"""Admin endpoints on their own port: /metrics, /live, /ready, /backends, /config."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from proxy import metrics
from proxy.config import Forecast
from proxy.server import Proxy


def metrics_registry(forecast: Forecast) -> CollectorRegistry:
    """With several workers, aggregate every worker's metrics files; else this process's.
    `forecast`: the config whose replica recommendation is computed from the workers'
    summed forecast (see fleet_replicas)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        registry.register(_FleetReplicas(multiprocess.MultiProcessCollector(None), forecast))
        return registry
    return REGISTRY


def fleet_replicas(families: Iterable[Metric], forecast: Forecast) -> Iterator[Metric]:
    """`families` with the recommended-replicas gauge computed from the summed forecast
    rate of all workers instead of merged from each worker's own value: a worker sees
    only its share of the load, and shares are uneven when a few keep-alive clients
    land on one worker."""
    if not forecast.enabled:
        yield from families
        return
    # Imported only now: importing proxy.forecast creates its gauges, which a proxy
    # without forecasting must not export.
    from proxy.forecast import FORECAST_RPS_NAME, REPLICAS_HELP, REPLICAS_NAME, recommended_replicas

    total_rps = None
    for family in families:
        if family.name == REPLICAS_NAME:
            continue
        if family.name == FORECAST_RPS_NAME and family.samples:
            total_rps = sum(sample.value for sample in family.samples)
        yield family
    if total_rps is not None:
        yield GaugeMetricFamily(REPLICAS_NAME, REPLICAS_HELP,
                                value=recommended_replicas(total_rps, forecast))


class _FleetReplicas:
    """A registry collector: the workers' metrics, through fleet_replicas."""

    def __init__(self, inner: Any, forecast: Forecast) -> None:
        self._inner = inner
        self._forecast = forecast

    def collect(self) -> Iterator[Metric]:
        return fleet_replicas(self._inner.collect(), self._forecast)


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1e3, 3)


def backends_snapshot(proxy: Proxy) -> dict[str, Any]:
    clusters = {}
    for name, cr in proxy.runtime.clusters.items():
        entries = []
        for state in cr.cluster.states.values():
            entry: dict[str, Any] = {
                "id": state.id,
                "url": state.backend.url,
                "weight": state.weight,
                "health": state.health.value,
                "reason": state.health_reason,
                "inflight": state.inflight,
                "ewma_ms": _ms(state.ewma_s()),
                "p50_ms": _ms(state.latency_percentile_s(50)),
                "p90_ms": _ms(state.latency_percentile_s(90)),
                "requests": state.requests,
                "errors": state.errors,
                "error_rate": round(state.error_rate(), 4),
                "ejections": state.ejections,
                "reported_load": state.reported_load,
            }
            entry["detectors"] = cr.checker.describe(state.id)
            entries.append(entry)
        # Two panics: "panic", nothing is ready and every backend gets traffic (Envoy's);
        # "health_panic", the checker holds back ejections that would leave too few ready.
        clusters[name] = {"policy": cr.policy_name, "panic": cr.cluster.panic,
                          "health_panic": cr.checker.panic, "backends": entries}
        # A learned policy says what it predicts and why it picks (onnx_latency: per
        # request class and backend, the terms of each score).
        describe = getattr(cr.policy, "describe", None)
        if describe is not None:
            clusters[name]["policy_state"] = describe()
    return {"worker": proxy_worker_id(), "clusters": clusters}


def proxy_worker_id() -> int:
    return int(os.environ.get("FORETELL_WORKER_ID", "0"))


def refresh_gauges(proxy: Proxy) -> None:
    """Publish hot-path counts; per-backend gauges are set here, not per request."""
    metrics.HOT.flush()
    for name, cr in proxy.runtime.clusters.items():
        metrics.CLUSTER_PANIC.labels(name).set(1 if cr.cluster.panic else 0)
        for state in cr.cluster.states.values():
            metrics.UPSTREAM_INFLIGHT.labels(name, state.id).set(state.inflight)
            metrics.BACKEND_EWMA.labels(name, state.id).set(state.ewma_s())
    metrics.ACTIVE_REQUESTS.set(proxy.active_requests)


def admin_app(get_proxy: Callable[[], Proxy], is_ready: Callable[[], bool]) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/metrics")
    async def _metrics(request: web.Request) -> web.Response:
        proxy = get_proxy()
        refresh_gauges(proxy)
        body = generate_latest(metrics_registry(proxy.runtime.config.forecast))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/live")
    async def _live(request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    @routes.get("/ready")
    async def _ready(request: web.Request) -> web.Response:
        if is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    @routes.get("/backends")
    async def _backends(request: web.Request) -> web.Response:
        return web.json_response(backends_snapshot(get_proxy()))

    @routes.get("/config")
    async def _config(request: web.Request) -> web.Response:
        proxy = get_proxy()
        return web.json_response({"source": str(proxy.runtime.loaded.source),
                                  "config": proxy.runtime.config.model_dump(mode="json")})

    app = web.Application()
    app.add_routes(routes)
    return app
