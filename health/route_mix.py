"""Route-mix adjustment shared by the latency and anomaly detectors: like with like.

Under request-aware routing (onnx_latency) one backend may get the expensive
route class and another the cheap one, and their latencies differ by the
mix, not by health. `route_factors` gives per route class the factor that
scales a sample to the cheapest class's latency, so that every request
counts as one of the cheapest class before backends are compared. A backend
votes for a class's reference from MIN_VOTE_SAMPLES samples of it in the
window; samples of a class without a vote are left as they are, as is every
sample when fewer than two classes have a reference (a single-class fleet).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

# A backend's median for a route class counts toward the class's reference from this
# many samples of the class in the window.
MIN_VOTE_SAMPLES = 3


def route_factors(recent: Mapping[str, Sequence[tuple[float, float, str]]]) -> dict[str, float]:
    """Route class -> the factor (<= 1) that scales its samples to the cheapest class's
    latency (the cheapest class's reference / this class's), from per backend (finished
    at, latency, route class) samples; {} when nothing is adjusted. A class's reference
    is the lower median over backends of each one's median for the class: one vote per
    backend, so a sick backend that got most of a class (before routing moved away from
    it) does not set the class's reference alone while another backend also serves it.
    A class routed to one backend alone is judged against that backend's own median: no
    comparison for that class, but a sudden slowdown still shows against the window's
    median, which lags. Factors <= 1 keep min_excess_s conservative: an adjusted excess
    is never more than the raw one."""
    per_class: dict[str, dict[str, list[float]]] = {}
    for backend_id, samples in recent.items():
        for _, lat, route_class in samples:
            per_class.setdefault(route_class, {}).setdefault(backend_id, []).append(lat)
    if len(per_class) < 2:
        return {}
    references = {}
    for route_class, by_backend in per_class.items():
        votes = [statistics.median(lats) for lats in by_backend.values()
                 if len(lats) >= MIN_VOTE_SAMPLES]
        reference_s = statistics.median_low(votes) if votes else 0.0
        if reference_s > 0:
            references[route_class] = reference_s
    if len(references) < 2:
        return {}
    cheapest_s = min(references.values())
    return {route_class: cheapest_s / ref_s for route_class, ref_s in references.items()}
