"""Typed settings for health checking (`health:` in config.yaml). A leaf module."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActiveProbe(_Frozen):
    """HTTP probe; defaults in the spirit of HAProxy (2 s, rise 2, fall 3)."""

    enabled: bool = True
    path: str = "/healthz"
    expected_statuses: list[int] = Field(default_factory=lambda: [200])
    interval_s: float = Field(2.0, gt=0)
    # Ejected backends are probed faster so they can come back sooner.
    ejected_interval_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)
    jitter_s: float = Field(0.2, ge=0)
    rise: int = Field(2, ge=1)
    fall: int = Field(3, ge=1)


class HealthConfig(_Frozen):
    active: ActiveProbe = ActiveProbe()
