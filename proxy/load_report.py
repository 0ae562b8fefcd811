"""Parse the `endpoint-load-metrics` response header (ORCA load report).

Only the text form is read: `TEXT cpu_utilization=0.3, rps_fractional=120`.
Envoy also accepts JSON and binary forms; a backend that sends those is
treated as reporting nothing.
"""

from __future__ import annotations

import math

# In order of preference: what the backend says its utilisation is.
_KEYS = ("application_utilization", "cpu_utilization")


def parse_utilization(value: str) -> float | None:
    """Utilisation in [0, 1+] from a TEXT load report, or None if absent or malformed."""
    if not value.startswith("TEXT "):
        return None
    found: dict[str, float] = {}
    for item in value[5:].split(","):
        key, sep, raw = item.strip().partition("=")
        if not sep or key not in _KEYS:
            continue
        try:
            number = float(raw)
        except ValueError:
            return None
        if not math.isfinite(number) or number < 0:
            return None
        found[key] = number
    for key in _KEYS:
        if key in found:
            return found[key]
    return None
