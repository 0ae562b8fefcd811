"""Shared pieces of the health unit tests: an injectable clock and outcome shorthands."""

from __future__ import annotations

from proxy.state import ERROR_CONNECT, ERROR_RESET, ERROR_TIMEOUT, Outcome


class Clock:
    """A clock tests advance by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


OK = Outcome(200, 0.010)
HTTP_503 = Outcome(503, 0.001)
CONNECT = Outcome(0, 0.001, ERROR_CONNECT)
RESET = Outcome(0, 0.002, ERROR_RESET)
TIMEOUT = Outcome(0, 1.0, ERROR_TIMEOUT)


def ok(latency_s: float) -> Outcome:
    return Outcome(200, latency_s)
