"""Consecutive-failures detector: N failures in a row eject (Envoy's consecutive_5xx).

Application 5xx and transport errors (connect, reset, timeout) are counted
apart: a refused connection is strong evidence after two in a row, a 5xx
might be one bad request, so it takes five. A success resets both counts.
"""

from __future__ import annotations

from health.base import Verdict
from health.config import ConsecutiveFailures as ConsecutiveConfig
from proxy.state import Clock, Outcome


class _Streak:
    __slots__ = ("http_5xx", "kinds", "since", "transport")

    def __init__(self) -> None:
        self.http_5xx = 0
        self.transport = 0
        # Error kinds seen in the current transport streak, for the reason string.
        self.kinds: set[str] = set()
        # When the streak first reached its threshold.
        self.since: float | None = None


class ConsecutiveFailures:
    name = "consecutive_failures"

    def __init__(self, config: ConsecutiveConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self._streaks: dict[str, _Streak] = {}

    def observe(self, backend_id: str, outcome: Outcome) -> None:
        streak = self._streaks.get(backend_id)
        if streak is None:
            streak = self._streaks[backend_id] = _Streak()
        if outcome.error_kind is not None:
            streak.transport += 1
            streak.kinds.add(outcome.error_kind)
        elif outcome.status >= 500:
            streak.http_5xx += 1
        else:
            streak.http_5xx = 0
            streak.transport = 0
            streak.kinds.clear()
            streak.since = None
            return
        if streak.since is None and self._tripped(streak):
            streak.since = self._clock()

    def _tripped(self, streak: _Streak) -> bool:
        return (streak.http_5xx >= self.config.consecutive_5xx
                or streak.transport >= self.config.consecutive_transport)

    def urgent(self, backend_id: str) -> bool:
        """Whether this backend has just tripped (lets the checker evaluate at once)."""
        streak = self._streaks.get(backend_id)
        return streak is not None and streak.since is not None

    def evaluate(self, now: float) -> list[Verdict]:
        verdicts = []
        cfg = self.config
        for backend_id, s in self._streaks.items():
            if s.transport >= cfg.consecutive_transport:
                kinds = "/".join(sorted(s.kinds))
                verdicts.append(Verdict(backend_id, self.name, True,
                                        f"{s.transport} transport errors in a row ({kinds}; "
                                        f"threshold {cfg.consecutive_transport})",
                                        float(s.transport) / cfg.consecutive_transport,
                                        unreachable=True))
            elif s.http_5xx >= cfg.consecutive_5xx:
                verdicts.append(Verdict(backend_id, self.name, True,
                                        f"{s.http_5xx} 5xx responses in a row "
                                        f"(threshold {cfg.consecutive_5xx})",
                                        float(s.http_5xx) / cfg.consecutive_5xx))
            else:
                verdicts.append(Verdict(backend_id, self.name, False,
                                        f"{s.http_5xx} 5xx / {s.transport} transport errors in a row",
                                        0.0))
        return verdicts

    def forget(self, backend_id: str) -> None:
        self._streaks.pop(backend_id, None)
