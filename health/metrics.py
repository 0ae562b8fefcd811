"""Health metrics, registered once at import into the default registry.

Gauges carry a multiprocess_mode because the proxy may run several workers,
each with its own checker; "livemax" reports the worst view across the live
workers (a dead worker's values leave with it).
"""

from __future__ import annotations

import contextlib
import os

from prometheus_client import Counter, Gauge, Histogram

HEALTH_STATES = ("healthy", "suspect", "ejected")

backend_health = Gauge(
    "foretell_backend_health_state",
    "1 for the backend's current health state (healthy, suspect, ejected), else 0",
    ["cluster", "backend", "state"], multiprocess_mode="livemax")

ejections = Counter(
    "foretell_health_ejections",
    "Ejection decisions by detector; mode=enforced ejected the backend, mode=detected "
    "was held back (shadow mode or a guard)",
    ["cluster", "detector", "mode"])

readmissions = Counter(
    "foretell_health_readmissions", "Backends re-admitted after an ejection", ["cluster"])

panic = Gauge(
    "foretell_health_panic",
    "1 while the cluster is in panic mode (too few backends would be ready; routing to all)",
    ["cluster"], multiprocess_mode="livemax")

anomaly_score = Gauge(
    "foretell_health_anomaly_score",
    "Latest Isolation Forest anomaly score per backend (higher is stranger)",
    ["cluster", "backend"], multiprocess_mode="livemax")

anomaly_threshold = Gauge(
    "foretell_health_anomaly_threshold", "Anomaly score threshold of the loaded model",
    ["cluster"], multiprocess_mode="livemax")

anomaly_reloads = Counter(
    "foretell_health_anomaly_reloads",
    "Anomaly model (re)loads by result (ok, failed: the previous model, if any, still scores)",
    ["cluster", "result"])

probe_duration = Histogram(
    "foretell_health_probe_duration_seconds", "Active probe round-trip time",
    ["cluster", "backend"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

probes = Counter(
    "foretell_health_probes", "Active probes by result", ["cluster", "backend", "result"])


def set_state(cluster: str, backend: str, state: str) -> None:
    for s in HEALTH_STATES:
        backend_health.labels(cluster, backend, s).set(1.0 if s == state else 0.0)


def _drop(gauge: Gauge, *labels: str) -> None:
    """Take a series out, so a gone backend or cluster does not show its last state for
    good (an "ejected" 1 an alert would fire on). With several workers (multiprocess
    mode) prometheus_client cannot remove one: it stays at 0."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ:
        gauge.labels(*labels).set(0.0)
        return
    with contextlib.suppress(KeyError):  # never set
        gauge.remove(*labels)


def forget_backend(cluster: str, backend: str) -> None:
    for s in HEALTH_STATES:
        _drop(backend_health, cluster, backend, s)
    _drop(anomaly_score, cluster, backend)


def forget_cluster_anomaly(cluster: str) -> None:
    _drop(anomaly_threshold, cluster)


def forget_cluster(cluster: str) -> None:
    _drop(panic, cluster)
    forget_cluster_anomaly(cluster)
