"""The policy interface: what a routing policy sees and returns.

A leaf module: imports nothing else of ours. Policies read backend state
through `BackendView` and never do I/O; the proxy hands them only backends
that health allows.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Protocol, get_args, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

Clock = Callable[[], float]


class BackendView(Protocol):
    """Read-only view of one backend's state (proxy.state.BackendState satisfies it)."""

    @property
    def id(self) -> str: ...
    @property
    def weight(self) -> int: ...
    inflight: int
    requests: int
    errors: int
    consecutive_failures: int
    last_error_at: float | None
    reported_load: float | None
    admitted_at: float
    waiting_since: float | None  # start of the oldest attempt still waiting for its response

    def ewma_s(self) -> float: ...
    def error_rate(self) -> float: ...
    def latency_percentile_s(self, q: float) -> float: ...


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class RequestInfo(NamedTuple):
    """What a policy may know about the request being routed.

    A NamedTuple: built once per request, and a tuple is the cheapest
    immutable record Python has.
    """

    method: str = "GET"
    path: str = "/"
    route_class: str = "default"
    body_size: int = 0  # Content-Length when known, else 0
    client_ip: str = ""
    headers: Mapping[str, str] = _NO_HEADERS


class PolicyOptions(BaseModel):
    """Base for a policy's options: frozen, unknown keys rejected, numbers finite and
    given as numbers (YAML `true` would otherwise pass for 1, and "3" for 3), as in
    proxy.config."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool | str) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            types = set(get_args(annotation)) or {annotation}
            if types & {int, float} and type(value) not in types:
                shown = str(value).lower() if isinstance(value, bool) else repr(value)
                raise ValueError(f"must be a number, not {shown}")
        return value


@dataclass(frozen=True, slots=True)
class NestedPolicy:
    """Marks an option that names another policy, built inside this one:

        base: Annotated[str, NestedPolicy("base_options")] = "p2c_peak_ewma"

    The registry validates the named policy and its options (the option
    `options_field`) with the outer one, recursively, so a bad one is a config
    error that names its option. `heuristic`: it must not be a learned policy
    (one whose class says `learned = True`) nor wrap one."""

    options_field: str
    heuristic: bool = False


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a policy is built with. Clock and RNG are injected so tests are exact."""

    clock: Clock = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    cluster: str = "default"
    # Route classes of the config, in order (bounded; used by learned policies).
    route_classes: Sequence[str] = ()


@runtime_checkable
class Policy(Protocol):
    name: ClassVar[str]

    def pick(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        """Synchronous and cheap. None means no backend: the proxy answers 503."""
        ...


class PolicyFactory(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type[PolicyOptions]]

    def __call__(self, options: Any, ctx: PolicyContext) -> Policy: ...
