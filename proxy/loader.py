"""Load config.yaml and validate everything the proxy will build from it.

`proxy.config` checks structure; this module also checks what needs other
packages (policy options, by each policy's own model, nested policies
included), so `check-config`, start-up and SIGHUP reload all reject the same
files with the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policies.registry import PolicyError, validate_options
from proxy.config import Config, invalid_config, read_config

# (dotted field, what is wrong with it)
Problem = tuple[str, str]


@dataclass(frozen=True)
class Loaded:
    config: Config
    source: Path
    # Validated policy options per cluster name.
    policy_options: dict[str, Any]
    # Anomaly models loaded while validating, per cluster name: the health checker takes
    # them instead of loading the files again.
    anomaly_models: dict[str, Any] = field(default_factory=dict)


def validate(config: Config, source: str | Path) -> Loaded:
    """Everything the proxy will build from `config`; ConfigError lists every problem."""
    problems: list[Problem] = []
    options: dict[str, Any] = {}
    anomaly_models: dict[str, Any] = {}
    for name, cluster in config.clusters.items():
        where = f"clusters.{name}"
        try:
            options[name] = validate_options(cluster.policy.kind, cluster.policy.options)
        except PolicyError as exc:
            problems += [(f"{where}.policy.{field}" if field else f"{where}.policy", problem)
                         for field, problem in exc.problems]
        model_path = cluster.health.anomaly.model_path
        if model_path is not None:
            # Load it now so a bad file is a config error, named, before any traffic.
            from health.anomaly import AnomalyModel, AnomalyModelError

            try:
                anomaly_models[name] = AnomalyModel(model_path)
            except AnomalyModelError as exc:
                problems.append((f"{where}.health.anomaly.model_path", str(exc)))
    if problems:
        raise invalid_config(str(source), problems)
    return Loaded(config=config, source=Path(source), policy_options=options,
                  anomaly_models=anomaly_models)


def load(path: str | Path) -> Loaded:
    return validate(read_config(path), path)
