"""A heuristic plus epsilon-uniform exploration, for collecting training telemetry (kind `explore`).

    policy:
      kind: explore
      base: p2c_peak_ewma      # any registered policy
      base_options: {}
      epsilon: 0.1

Every request first asks `base` for its choice b; then with probability
`epsilon` a uniformly random ready backend is used instead. The reported
`last_propensity` of the chosen backend a is

    epsilon / n + (1 - epsilon) * [a == b]

i.e. conditional on the base's own (exogenous) randomness, which is exactly
what inverse-propensity estimates of any other policy need: every backend has
probability at least epsilon/n, and the logged probability is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

from pydantic import Field

from policies import registry
from policies.base import BackendView, NestedPolicy, PolicyContext, PolicyOptions, RequestInfo


class Explore:
    name: ClassVar[str] = "explore"

    class Options(PolicyOptions):
        base: Annotated[str, NestedPolicy("base_options")] = "p2c_peak_ewma"
        base_options: dict[str, Any] = Field(default_factory=dict)
        epsilon: float = Field(0.1, ge=0, le=1)

    def __init__(self, options: Options, ctx: PolicyContext) -> None:
        self.options = options
        self._rng = ctx.rng
        self.base = registry.create(options.base, options.base_options, ctx)
        self.last_propensity: float | None = None

    def pick(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        b = self.base.pick(ready, req)
        n = len(ready)
        if b is None or n == 0:
            self.last_propensity = None
            return b
        eps = self.options.epsilon
        chosen = ready[self._rng.randrange(n)] if self._rng.random() < eps else b
        self.last_propensity = eps / n + (1.0 - eps) * (chosen is b)
        return chosen

    def observe(self, backend: BackendView, req: RequestInfo, outcome: Any) -> None:
        observe = getattr(self.base, "observe", None)
        if observe is not None:
            observe(backend, req, outcome)

    async def run_background(self) -> None:
        run = getattr(self.base, "run_background", None)
        if run is not None:
            await run()

    def take_over(self, previous: object) -> None:
        take_over = getattr(self.base, "take_over", None)
        if take_over is not None:
            take_over(previous.base if isinstance(previous, Explore) else previous)

    def close(self) -> None:
        close = getattr(self.base, "close", None)
        if close is not None:
            close()

    def describe(self) -> dict[str, object]:
        """The admin's /backends policy_state: epsilon, and the base's own state when it
        has one (onnx_latency wrapped in explore still explains its scores)."""
        state: dict[str, object] = {"base": self.options.base, "epsilon": self.options.epsilon}
        describe = getattr(self.base, "describe", None)
        if describe is not None:
            state["base_state"] = describe()
        return state

    def __repr__(self) -> str:
        return f"Explore(base={self.options.base!r}, epsilon={self.options.epsilon})"
