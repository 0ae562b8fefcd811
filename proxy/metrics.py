"""Data-plane metrics. `foretell_` prefix, base units, bounded labels.

Labelled children are cached per label tuple: `.labels()` costs more than
the increment itself, and the label values here come from bounded sets
(cluster and backend ids from config, code classes, error reasons).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("foretell_requests", "Client requests answered, by cluster and status class",
                   ["cluster", "code_class"])
UPSTREAM_REQUESTS = Counter("foretell_upstream_requests",
                            "Upstream attempts, by backend and status class ('error' when no response)",
                            ["cluster", "backend", "code_class"])
UPSTREAM_LATENCY = Histogram("foretell_upstream_latency_seconds",
                             "Time from sending to an upstream until its response headers",
                             ["cluster", "backend"], buckets=LATENCY_BUCKETS_S)
UPSTREAM_INFLIGHT = Gauge("foretell_upstream_inflight", "Attempts in flight per backend",
                          ["cluster", "backend"], multiprocess_mode="livesum")
BACKEND_EWMA = Gauge("foretell_backend_ewma_seconds", "Decayed peak-EWMA latency per backend",
                     ["cluster", "backend"], multiprocess_mode="liveall")
RETRIES = Counter("foretell_retries", "Retries, by the reason of the failed attempt",
                  ["cluster", "reason"])
RETRIES_DENIED = Counter("foretell_retries_budget_exhausted",
                         "Retries not made because the retry budget was used up", ["cluster"])
ERRORS = Counter("foretell_errors", "Requests the proxy answered itself with an error, by reason",
                 ["cluster", "reason"])
PICKS = Counter("foretell_policy_picks", "Backend choices by policy", ["cluster", "policy"])
ACTIVE_REQUESTS = Gauge("foretell_active_requests", "Client requests in progress",
                        multiprocess_mode="livesum")
CONFIG_RELOADS = Counter("foretell_config_reloads",
                         "Config reload attempts by result (each worker counts its own)", ["result"])
CLUSTER_PANIC = Gauge("foretell_cluster_panic",
                      "1 when no backend is healthy and the cluster routes to all of them",
                      ["cluster"], multiprocess_mode="livemax")


def cached_labels(metric: Any) -> Callable[..., Any]:
    """`metric.labels` memoised on its (bounded) label values."""
    return lru_cache(maxsize=4096)(metric.labels)


retries = cached_labels(RETRIES)
errors = cached_labels(ERRORS)
_LATENCY_BOUNDS_S = (*LATENCY_BUCKETS_S, float("inf"))


class HotCounts:
    """Per-request counts kept in plain dicts and published by `flush()`.

    A prometheus_client increment takes a lock and a label lookup; at tens of
    thousands of requests per second that is a visible share of the proxy's
    CPU. The worker flushes every second and before answering a scrape, so
    /metrics is at most a second behind (Envoy flushes stats every 5 s).
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.upstream: dict[tuple[str, str, str], int] = {}
        self.picks: dict[tuple[str, str], int] = {}
        # (cluster, backend) -> [count per bucket..., sum of seconds]
        self.latency: dict[tuple[str, str], list[float]] = {}

    def observe_latency(self, cluster: str, backend: str, latency_s: float) -> None:
        key = (cluster, backend)
        counts = self.latency.get(key)
        if counts is None:
            counts = self.latency[key] = [0.0] * (len(_LATENCY_BOUNDS_S) + 1)
        counts[bisect_left(_LATENCY_BOUNDS_S, latency_s)] += 1
        counts[-1] += latency_s

    def flush(self) -> None:
        requests, self.requests = self.requests, {}
        upstream, self.upstream = self.upstream, {}
        picks, self.picks = self.picks, {}
        latency, self.latency = self.latency, {}
        for key, n in requests.items():
            REQUESTS.labels(*key).inc(n)
        for key3, n in upstream.items():
            UPSTREAM_REQUESTS.labels(*key3).inc(n)
        for key, n in picks.items():
            PICKS.labels(*key).inc(n)
        for key, counts in latency.items():
            child = UPSTREAM_LATENCY.labels(*key)
            # prometheus_client has no bulk observe; its Histogram keeps one
            # value per bucket (`_buckets`, non-cumulative) and `_sum`.
            for i, in_bucket in enumerate(counts[:-1]):
                if in_bucket:
                    child._buckets[i].inc(in_bucket)
            child._sum.inc(counts[-1])


HOT = HotCounts()


_CODE_CLASSES = {c: f"{c}xx" for c in range(1, 6)}


def code_class(status: int) -> str:
    """'2xx', '5xx', ... or 'error' when there was no HTTP response."""
    return _CODE_CLASSES.get(status // 100, "error") if status else "error"
