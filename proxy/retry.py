"""When a failed try may be replayed: `retries:` of the config, compiled once per config."""

from __future__ import annotations

from proxy.config import Config
from proxy.state import ERROR_CONNECT, ERROR_RESET, ERROR_TIMEOUT

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Read-only (RFC 9110 §9.2.1): replayed even after the backend answered, when its answer
# broke off before the client saw any of it (PUT and DELETE are not: it may have acted).
SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
GATEWAY_ERRORS = frozenset({502, 503, 504})
_RETRY_ON_OF_KIND = {ERROR_CONNECT: "connect-failure", ERROR_RESET: "reset", ERROR_TIMEOUT: "timeout"}


class RetryPlan:
    """What the request path asks of `retries:`, answered without touching the config models."""

    __slots__ = ("attempts", "budget_min", "budget_share", "kinds", "statuses")

    def __init__(self, config: Config) -> None:
        retries = config.retries
        self.attempts = retries.attempts
        # Concurrent retries allowed: a share of active requests, never below a floor.
        self.budget_min = retries.budget.min_concurrent
        self.budget_share = retries.budget.percent / 100.0
        self.kinds = frozenset(k for k, name in _RETRY_ON_OF_KIND.items() if name in retries.retry_on)
        self.statuses: frozenset[int] = (
            frozenset(range(500, 600)) if "5xx" in retries.retry_on
            else GATEWAY_ERRORS if "gateway-error" in retries.retry_on else frozenset())

    def may_retry(self, method: str, body_started: bool, kind: str | None, status: int) -> bool:
        """Whether a try that ended with (error kind, status) may be replayed elsewhere."""
        if kind is not None:
            if kind not in self.kinds:
                return False
        elif status not in self.statuses:
            return False
        if body_started:
            return False
        # A connect failure sent nothing, so any method is safe to replay.
        return kind == ERROR_CONNECT or method in IDEMPOTENT
