"""Typed settings for health checking (`health:` in config.yaml). A leaf module.

The defaults are the shipped behaviour: a config without a `health:` section
gets them, and they are what bench/health_bench.py measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator


class _Frozen(BaseModel):
    # Numbers are StrictInt/StrictFloat (YAML `true` is not 1) and finite (`.inf` is no timeout).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _starts_with_slash(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"must start with '/', got {path!r}")
    return path


# The path part of a URL (a probe's, a route's prefix).
UrlPath = Annotated[str, AfterValidator(_starts_with_slash)]


class ActiveProbe(_Frozen):
    """HTTP probe; defaults in the spirit of HAProxy (2 s, rise 2, fall 3)."""

    enabled: bool = True
    # Appended to the backend's URL: without the '/' every probe would fail.
    path: UrlPath = "/healthz"
    expected_statuses: list[Annotated[StrictInt, Field(ge=100, le=599)]] = Field(
        default_factory=lambda: [200], min_length=1)
    interval_s: StrictFloat = Field(default=2.0, gt=0)
    # Ejected backends are probed faster so they can come back sooner.
    ejected_interval_s: StrictFloat = Field(default=0.5, gt=0)
    timeout_s: StrictFloat = Field(default=1.0, gt=0)
    jitter_s: StrictFloat = Field(default=0.2, ge=0)
    rise: StrictInt = Field(default=2, ge=1)
    fall: StrictInt = Field(default=3, ge=1)
    # Log and count probe-driven ejections without ejecting.
    shadow: bool = False


class ConsecutiveFailures(_Frozen):
    """Eject after N failures in a row; application 5xx and transport errors
    (connect, reset, timeout) are counted apart, with their own thresholds."""

    enabled: bool = True
    shadow: bool = False
    consecutive_5xx: StrictInt = Field(default=5, ge=1)
    # A refused or reset connection is a stronger signal than one 5xx.
    consecutive_transport: StrictInt = Field(default=2, ge=1)


class SuccessRate(_Frozen):
    """Failure rate over a sliding time window, against the fleet's median."""

    enabled: bool = True
    shadow: bool = False
    window_s: StrictFloat = Field(default=2.0, gt=0)
    bucket_s: StrictFloat = Field(default=0.25, gt=0)
    # Backends with fewer requests in the window are not judged.
    min_requests: StrictInt = Field(default=20, ge=1)
    # The fleet median is only used when this many backends have enough volume;
    # otherwise the comparison is against zero failures.
    min_hosts: StrictInt = Field(default=3, ge=1)
    # Detected when failure_rate >= fleet median + margin and >= min_failure_rate.
    margin: StrictFloat = Field(default=0.2, gt=0, le=1)
    min_failure_rate: StrictFloat = Field(default=0.25, gt=0, le=1)

    @model_validator(mode="after")
    def _buckets(self) -> SuccessRate:
        if self.bucket_s > self.window_s:
            raise ValueError("bucket_s must not exceed window_s")
        return self


DEFAULT_RECENT_MAX_AGE_S = 30.0


class LatencyOutlier(_Frozen):
    """A backend's recent latency quantile against the fleet median of that quantile."""

    enabled: bool = True
    shadow: bool = False
    quantile: StrictFloat = Field(default=90.0, gt=0, lt=100)
    # Only samples younger than window_s, and at most the last max_samples, count.
    window_s: StrictFloat = Field(default=5.0, gt=0)
    max_samples: StrictInt = Field(default=32, ge=4)
    min_requests: StrictInt = Field(default=8, ge=1)
    min_hosts: StrictInt = Field(default=3, ge=1)
    # Detected when quantile >= ratio * fleet median and exceeds it by min_excess_s.
    ratio: StrictFloat = Field(default=4.0, gt=1)
    min_excess_s: StrictFloat = Field(default=0.010, ge=0)
    # Also detected when the geometric mean latency of the backend's last
    # recent_requests attempts (by start time; a still-waiting one counts once past
    # the limit) reaches ratio x the fleet median p50: routing starves a slow
    # backend, so its window turns over slowly. They must also be 2x the backend's
    # earlier kept samples (a change, not a steadily ~3x slower backend) unless those
    # are past the limit themselves. 0 turns this rule off.
    recent_requests: StrictInt = Field(default=5, ge=0)
    # The recent rule's attempts may be older than window_s, up to this age (by when
    # they finished): a backend starved to fewer than recent_requests per window is
    # still judged on its last few answers. Unset: 30 s, or window_s if longer.
    recent_max_age_s: StrictFloat | None = Field(default=None, gt=0)
    # Scale each sample by (fleet median) / (its route class's fleet median) before
    # comparing, so a backend that gets the expensive requests (request-aware routing)
    # is not taken for a slow one (health/latency.py).
    route_adjusted: bool = True

    @model_validator(mode="after")
    def _recent_age(self) -> LatencyOutlier:
        if self.recent_max_age_s is not None and self.recent_max_age_s < self.window_s:
            raise ValueError("recent_max_age_s must be at least window_s")
        return self

    @property
    def recent_horizon_s(self) -> float:
        """How far back the recent rule's attempts may reach."""
        if self.recent_max_age_s is not None:
            return self.recent_max_age_s
        return max(DEFAULT_RECENT_MAX_AGE_S, self.window_s)


class Anomaly(_Frozen):
    """Isolation Forest over fleet-relative window features (ONNX, scored periodically).

    Runs only when `model_path` is set; a missing or invalid model is an
    error at start-up and a logged error (old model kept) on reload.
    """

    model_path: Path | None = None
    shadow: bool = False
    interval_s: StrictFloat = Field(default=1.0, gt=0)
    window_s: StrictFloat = Field(default=5.0, gt=0)
    min_requests: StrictInt = Field(default=10, ge=1)
    # Evaluations in a row above the model's threshold before it counts as detected.
    consecutive: StrictInt = Field(default=3, ge=1)
    # Append each evaluation's feature rows (JSON lines) here: training data
    # for `foretell train anomaly`. Works without a model.
    record_path: Path | None = None
    # Scale latencies to the cheapest route class's before the fleet comparison
    # (health.route_mix), as the latency detector does.
    route_adjusted: bool = True


class Ejection(_Frozen):
    """Guards applied to every detector's decision."""

    # How often passive detectors are evaluated (5xx detection within ~1 s needs <= 0.5).
    evaluate_interval_s: StrictFloat = Field(default=0.25, gt=0)
    # Passive and anomaly ejections stop once this share of the cluster is out
    # (as in Envoy, one ejection is always allowed).
    max_ejection_percent: StrictFloat = Field(default=50.0, ge=0, le=100)
    # Panic: when fewer than this share would stay ready, route to all and say so.
    panic_threshold_percent: StrictFloat = Field(default=30.0, ge=0, le=100)
    # Ejection time is base * n for the n-th recent ejection, at most max.
    base_ejection_s: StrictFloat = Field(default=5.0, gt=0)
    max_ejection_s: StrictFloat = Field(default=60.0, gt=0)
    # Ejection time when the backend did not answer at all (transport errors, failed
    # probes) and active probes are on: it returns once `rise` probes pass.
    unreachable_ejection_s: StrictFloat = Field(default=1.0, gt=0)
    # n drops by one per this much time without an ejection.
    multiplier_decay_s: StrictFloat = Field(default=30.0, gt=0)
    # Re-admission waits a random extra 0..jitter so ejected backends do not return together.
    readmit_jitter_s: StrictFloat = Field(default=0.5, ge=0)

    @model_validator(mode="after")
    def _order(self) -> Ejection:
        if self.max_ejection_s < self.base_ejection_s:
            raise ValueError("max_ejection_s must be at least base_ejection_s")
        return self


class HealthConfig(_Frozen):
    active: ActiveProbe = Field(default_factory=ActiveProbe)
    consecutive: ConsecutiveFailures = Field(default_factory=ConsecutiveFailures)
    success_rate: SuccessRate = Field(default_factory=SuccessRate)
    latency: LatencyOutlier = Field(default_factory=LatencyOutlier)
    anomaly: Anomaly = Field(default_factory=Anomaly)
    ejection: Ejection = Field(default_factory=Ejection)
