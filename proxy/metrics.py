"""Data-plane metrics. `foretell_` prefix, base units, bounded labels.

Labelled children are cached per label tuple: `.labels()` costs more than
the increment itself, and the label values here come from bounded sets
(cluster and backend ids from config, code classes, error reasons).
"""

from __future__ import annotations

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
CONFIG_RELOADS = Counter("foretell_config_reloads", "Config reload attempts by result", ["result"])
CLUSTER_PANIC = Gauge("foretell_cluster_panic",
                      "1 when no backend is healthy and the cluster routes to all of them",
                      ["cluster"], multiprocess_mode="max")


def cached_labels(metric: Any) -> Callable[..., Any]:
    """`metric.labels` memoised on its (bounded) label values."""
    return lru_cache(maxsize=4096)(metric.labels)


requests = cached_labels(REQUESTS)
upstream_requests = cached_labels(UPSTREAM_REQUESTS)
upstream_latency = cached_labels(UPSTREAM_LATENCY)
retries = cached_labels(RETRIES)
errors = cached_labels(ERRORS)
picks = cached_labels(PICKS)


def code_class(status: int) -> str:
    return f"{status // 100}xx" if status else "error"
