"""The health vocabulary: detector and prober protocols and what they report.

A leaf module: imports nothing of ours but proxy.state (itself a leaf).

A detector is fed every outcome through `observe` (the hot path: O(1), no
sorting, no I/O) and is asked for its verdicts by the health checker every
few hundred milliseconds through `evaluate`, where the real work happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from proxy.state import Backend, Outcome


@dataclass(frozen=True, slots=True)
class Verdict:
    """One detector's opinion of one backend at one evaluation."""

    backend_id: str
    detector: str
    detected: bool
    reason: str
    # Detector-specific severity (a count, a rate, a ratio, an anomaly score);
    # larger is worse. Used to eject the worst first when a guard limits ejections.
    score: float = 0.0
    # The backend does not answer at all (refused, reset, timed out): it is down,
    # not sick, so it may return as soon as probes pass (no growing ejection time).
    unreachable: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"detected": self.detected, "reason": self.reason, "score": round(self.score, 4)}


@runtime_checkable
class Detector(Protocol):
    """A passive or anomaly detector."""

    name: str

    def observe(self, backend_id: str, outcome: Outcome) -> None:
        """Record one outcome. Hot path: O(1)."""
        ...

    def evaluate(self, now: float) -> list[Verdict]:
        """Verdicts for every backend the detector has an opinion about."""
        ...

    def forget(self, backend_id: str) -> None:
        """Drop a backend's history (on re-admission, so old evidence is not reused)."""
        ...


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one active health probe."""

    ok: bool
    rtt_s: float
    status: int = 0  # 0 when no HTTP response came back
    error: str = ""  # short reason when not ok

    def describe(self) -> str:
        if self.ok:
            return f"probe ok ({self.status}, {self.rtt_s * 1e3:.1f} ms)"
        return f"probe failed ({self.error or f'status {self.status}'})"


@runtime_checkable
class Prober(Protocol):
    """An active check of one backend."""

    async def probe(self, backend: Backend) -> ProbeResult: ...

    async def close(self) -> None: ...


def worst_first(verdicts: Sequence[Verdict]) -> list[Verdict]:
    """Detected verdicts, most severe first (stable for equal scores)."""
    return sorted((v for v in verdicts if v.detected), key=lambda v: -v.score)
