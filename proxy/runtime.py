"""What one validated config becomes inside a worker: clusters, policies, health, router.

A `Runtime` is built whole and swapped whole on reload; a request keeps
using the runtime it started with. Clusters keep their backend state across
reloads when a backend's identity is unchanged (health, inflight, latency
estimates: a new `ewma_decay_s` applies to them as they are).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from health.checker import HealthChecker
from policies import registry
from policies.base import Policy, PolicyContext
from proxy.config import ClusterSpec, Config, UpstreamTls
from proxy.loader import Loaded
from proxy.retry import RetryPlan
from proxy.router import Router
from proxy.state import Backend, Cluster
from proxy.upstream import Upstream, client_ssl_context

log = logging.getLogger("foretell.runtime")


def _ca_file(tls: UpstreamTls) -> str | None:
    # Without verification nothing is checked against a CA: the file is not even read.
    return str(tls.ca_file) if tls.ca_file and tls.verify else None


def upstream_ssl(tls: UpstreamTls) -> ssl.SSLContext | bool:
    """For aiohttp (health probes): False skips verification."""
    return client_ssl_context(True, _ca_file(tls)) if tls.verify else False


def new_upstream(tls: UpstreamTls) -> Upstream:
    return Upstream(verify=tls.verify, ca_file=_ca_file(tls))


@dataclass
class ClusterRuntime:
    name: str
    spec: ClusterSpec
    cluster: Cluster
    policy: Policy
    upstream: Upstream
    checker: HealthChecker
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Looked up once here rather than per request:
    pick_key: tuple[str, str] = field(init=False)  # metric labels of a pick
    observe: Callable[..., None] | None = field(init=False)  # the policy's optional outcome hook

    def __post_init__(self) -> None:
        self.pick_key = (self.name, self.policy_name)
        self.observe = getattr(self.policy, "observe", None)

    @property
    def policy_name(self) -> str:
        return type(self.policy).name

    def start_policy_background(self) -> None:
        run = getattr(self.policy, "run_background", None)
        if run is not None:
            self.tasks.append(asyncio.create_task(run(), name=f"policy-{self.name}"))

    async def stop_policy(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
        _close_policy(self.policy)


def _close_policy(policy: Policy) -> None:
    close = getattr(policy, "close", None)
    if close is not None:
        close()


@dataclass
class Runtime:
    loaded: Loaded
    router: Router
    clusters: dict[str, ClusterRuntime]
    retry_plan: RetryPlan = field(init=False)
    # Requests that started on this runtime and are not finished: a retired
    # runtime's upstream pools are closed only once this reaches zero.
    active: int = 0

    def __post_init__(self) -> None:
        config = self.loaded.config
        self.retry_plan = RetryPlan(config)

    @property
    def config(self) -> Config:
        return self.loaded.config


@dataclass
class Retired:
    """What a reload replaced: stopped at once, or closed once old requests finish."""

    now: list[Any] = field(default_factory=list)  # health checkers, policies
    upstreams: list[Upstream] = field(default_factory=list)


def backends_of(spec: ClusterSpec) -> list[Backend]:
    return [Backend(id=b.id, url=b.url, weight=b.weight) for b in spec.backends]


async def build(loaded: Loaded, previous: Runtime | None, *, clock: Callable[[], float] = time.monotonic,
                seed: int | None = None) -> tuple[Runtime, Retired]:
    """A new runtime, reusing what is unchanged from `previous`.

    First everything that can fail is prepared without touching what serves
    now (upstream pools, policies); then the change is committed (membership,
    health checkers). A failure in the first part leaves the old runtime
    exactly as it was and closes what was started.
    """
    config = loaded.config
    old = previous.clusters if previous else {}
    started: list[Any] = []
    prepared: dict[str, tuple[ClusterRuntime | None, Upstream, Policy]] = {}
    try:
        for name, spec in config.clusters.items():
            prev = old.get(name)
            if prev is not None and prev.spec.tls == spec.tls:
                upstream = prev.upstream
            else:
                upstream = new_upstream(spec.tls)
                started.append(upstream)
            if prev is not None and prev.spec.policy == spec.policy:
                policy = prev.policy
            else:
                ctx = PolicyContext(clock=clock, rng=random.Random(seed), cluster=name,
                                    route_classes=tuple(config.route_classes()))
                policy = registry.create(spec.policy.kind, loaded.policy_options[name], ctx)
            prepared[name] = (prev, upstream, policy)
    except BaseException:
        await retire(started)
        for _, _, policy in prepared.values():
            if all(policy is not cr.policy for cr in old.values()):
                _close_policy(policy)
        raise
    clusters: dict[str, ClusterRuntime] = {}
    retired = Retired()
    for name, spec in config.clusters.items():
        prev, upstream, policy = prepared[name]
        if prev is not None:
            cluster = prev.cluster
            cluster.set_decay_s(spec.ewma_decay_s)
            cluster.set_backends(backends_of(spec))
        else:
            cluster = Cluster(name, backends_of(spec), clock=clock, decay_s=spec.ewma_decay_s)
        cluster.panic_routing = spec.panic_routing
        if prev is not None and prev.spec.health == spec.health \
                and prev.spec.backends == spec.backends and prev.spec.tls == spec.tls:
            checker = prev.checker
        else:
            checker = HealthChecker(cluster, spec.health, clock=clock, ssl=upstream_ssl(spec.tls),
                                    anomaly_model=loaded.anomaly_models.get(name))
            await checker.start()
            if prev is not None:
                retired.now.append(prev.checker)
        cr = ClusterRuntime(name, spec, cluster, policy, upstream, checker)
        if prev is not None and policy is prev.policy:
            cr.tasks = prev.tasks
        else:
            take_over = getattr(policy, "take_over", None)
            if take_over is not None and prev is not None:
                take_over(prev.policy)  # e.g. a model the new one could not load itself
            cr.start_policy_background()
            if prev is not None:
                retired.now.append(("policy", prev))
        if prev is not None and upstream is not prev.upstream:
            retired.upstreams.append(prev.upstream)
        clusters[name] = cr
    for name, prev in old.items():
        if name not in clusters:
            retired.now.extend([prev.checker, ("policy", prev)])
            retired.upstreams.append(prev.upstream)
    return Runtime(loaded, Router(config.routes), clusters), retired


async def retire(parts: list[Any]) -> None:
    for part in parts:
        try:
            if isinstance(part, Upstream):
                await part.close()
            elif isinstance(part, HealthChecker):
                await part.stop()
            elif isinstance(part, tuple) and part[0] == "policy":
                await part[1].stop_policy()
        except Exception:
            log.exception("error while closing %r", part)


async def close(runtime: Runtime) -> None:
    parts: list[Any] = []
    for cr in runtime.clusters.values():
        parts.extend([cr.checker, ("policy", cr), cr.upstream])
    await retire(parts)
