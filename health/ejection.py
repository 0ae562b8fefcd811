"""Ejection decisions and their guards, as pure functions of their inputs.

The checker gathers, per backend, whether it is ejected, until when, what the
active probe says, and what each detector found; `decide` says what to do and
why; the checker applies it through `cluster.set_health` and logs the reason.

Guards (Envoy's outlier detection, with HAProxy's warning in mind):
- a detector in shadow mode only marks a backend SUSPECT;
- passive and anomaly ejections stop at `max_ejection_percent` of the
  cluster (one ejection is always allowed); a failing active probe is hard
  evidence and is not capped;
- if too few backends would stay ready, the cluster panics: everyone serves;
- ejection time grows with repeated ejections, up to a cap, and the count
  decays while the backend behaves;
- an ejected backend returns only once its time is over and its probes pass.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class Finding:
    """A detected verdict, after shadow mode is applied."""

    detector: str
    reason: str
    score: float = 0.0
    enforced: bool = True  # False: shadow mode, log and count only
    hard: bool = False  # not capped by max_ejection_percent (the active probe)
    unreachable: bool = False  # down rather than sick: short ejection, probes decide


@dataclass(frozen=True, slots=True)
class BackendStatus:
    backend_id: str
    ejected: bool
    eject_until: float = 0.0
    probe_up: bool | None = None  # None when active probing is off
    findings: tuple[Finding, ...] = ()


class Action(enum.Enum):
    EJECT = "eject"
    KEEP_EJECTED = "keep_ejected"
    READMIT = "readmit"
    SUSPECT = "suspect"  # detected but serving (shadow mode or a guard)
    HEALTHY = "healthy"


@dataclass(frozen=True, slots=True)
class Decision:
    backend_id: str
    action: Action
    reason: str
    detector: str = ""
    unreachable: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    decisions: tuple[Decision, ...]
    ejected: int  # backends that stay or become ejected
    panic: bool
    panic_reason: str = ""


def may_eject(total: int, ejected: int, max_percent: float) -> bool:
    """Envoy's rule: eject while the ejected share is below the cap (so one is always allowed)."""
    return total > 0 and ejected < total and ejected * 100.0 / total < max_percent


def in_panic(total: int, ready: int, threshold_percent: float) -> bool:
    return total > 0 and ready * 100.0 < threshold_percent * total


def ejection_duration_s(base_s: float, max_s: float, multiplier: int) -> float:
    """base * n for the n-th recent ejection, capped (Envoy's base_ejection_time)."""
    return min(max_s, base_s * max(1, multiplier))


def decayed_multiplier(multiplier: int, last_ejected_at: float | None, now: float,
                       decay_s: float) -> int:
    """The multiplier drops by one per `decay_s` since the last ejection."""
    if last_ejected_at is None or multiplier <= 0:
        return 0
    steps = math.floor(max(0.0, now - last_ejected_at) / decay_s)
    return max(0, multiplier - steps)


def decide(statuses: Sequence[BackendStatus], now: float, max_ejection_percent: float,
           panic_threshold_percent: float) -> Plan:
    total = len(statuses)
    decisions: list[Decision] = []
    ejected = 0
    candidates: list[tuple[BackendStatus, Finding]] = []
    for st in statuses:
        if st.ejected:
            if now >= st.eject_until and st.probe_up is not False:
                how = "probes passing" if st.probe_up else "no active probe"
                decisions.append(Decision(st.backend_id, Action.READMIT,
                                          f"re-admitted: ejection time over, {how}"))
            else:
                ejected += 1
                why = (f"{st.eject_until - now:.1f} s of ejection left" if now < st.eject_until
                       else "waiting for probes to pass")
                decisions.append(Decision(st.backend_id, Action.KEEP_EJECTED, f"ejected: {why}"))
            continue
        enforced = [f for f in st.findings if f.enforced]
        if enforced:
            worst = max(enforced, key=lambda f: (f.hard, f.score))
            candidates.append((st, worst))
            continue
        if st.findings:
            shadow = "; ".join(f"{f.detector}: {f.reason}" for f in st.findings)
            decisions.append(Decision(st.backend_id, Action.SUSPECT, f"shadow mode: {shadow}",
                                      st.findings[0].detector))
        else:
            decisions.append(Decision(st.backend_id, Action.HEALTHY, "no detector fired"))
    # Hard evidence first, then the most severe, so a cap keeps out the worst.
    candidates.sort(key=lambda c: (not c[1].hard, -c[1].score))
    for st, f in candidates:
        if f.hard or may_eject(total, ejected, max_ejection_percent):
            ejected += 1
            decisions.append(Decision(st.backend_id, Action.EJECT, f"{f.detector}: {f.reason}",
                                      f.detector, f.unreachable))
        else:
            decisions.append(Decision(
                st.backend_id, Action.SUSPECT,
                f"{f.detector}: {f.reason}; not ejected: max_ejection_percent "
                f"{max_ejection_percent:g}% reached ({ejected} of {total} out)", f.detector))
    ready = total - ejected
    panic = in_panic(total, ready, panic_threshold_percent)
    panic_reason = (f"panic: only {ready} of {total} backends would be ready "
                    f"(< {panic_threshold_percent:g}%); routing to all" if panic else "")
    order = {st.backend_id: i for i, st in enumerate(statuses)}
    decisions.sort(key=lambda d: order[d.backend_id])
    return Plan(tuple(decisions), ejected, panic, panic_reason)
