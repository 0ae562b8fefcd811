"""Policy names in bench commands: a kind, or `KIND@LABEL` for one kind under two settings.

    --policies onnx_latency,onnx_latency@new
    --policy-options '{"onnx_latency": {"model_path": "old.onnx"},
                       "onnx_latency@new": {"model_path": "new.onnx"}}'

A labelled run gets its kind's options with its own on top, and keeps its full
name in tables and results. In `bench run`, "{scenario}" in an option's string
stands for the scenario's name (`"model_path": "models/{scenario}.onnx"`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def policy_kind(name: str) -> str:
    """`KIND@LABEL` -> KIND; a plain kind is itself."""
    return name.partition("@")[0]


def options_for(name: str, policy_options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A run's policy options: its kind's, then `KIND@LABEL`'s on top (one level: a nested
    option such as fallback_options is replaced, not merged)."""
    kind = policy_kind(name)
    return {**policy_options.get(kind, {}), **(policy_options.get(name, {}) if name != kind else {})}


SCENARIO = "{scenario}"


def for_scenario(value: Any, scenario: str) -> Any:
    """`value` with "{scenario}" replaced by the scenario's name in every string inside it,
    so one command can give each scenario its own model (models/{scenario}.onnx) or
    telemetry directory."""
    if isinstance(value, str):
        return value.replace(SCENARIO, scenario)
    if isinstance(value, Mapping):
        return {k: for_scenario(v, scenario) for k, v in value.items()}
    if isinstance(value, list):
        return [for_scenario(v, scenario) for v in value]
    return value


def check_model_file(name: str, options: Mapping[str, Any], *, absolute: bool = False,
                     load: bool = False) -> dict[str, Any]:
    """`options` for policy `name`, refused (ValueError) when it is an onnx_latency whose model
    file does not exist: the proxy would route with its fallback all along, and the
    table would show the fallback under the learned policy's name. With `load`, also
    when the file is not a model the proxy would load (corrupt, another schema); off
    for the cost benches, whose `@nomodel` variants measure the fallback path on
    purpose. With `absolute`, a relative model path is made absolute (for proxies
    started in another directory)."""
    if policy_kind(name) != "onnx_latency":
        return dict(options)
    path = Path(str(options.get("model_path", "models/latency.onnx")))
    if SCENARIO in str(path):
        raise ValueError(f"{name}: model_path {str(path)!r}: {SCENARIO} is only filled in by bench run")
    if not path.is_file():
        raise ValueError(f"{name}: model file {str(path)!r} does not exist (train one with "
                         "foretell train latency, or pass model_path in --policy-options)")
    if load:
        from policies.onnx_latency import ModelError, load_model

        try:
            load_model(path)
        except ModelError as exc:
            raise ValueError(f"{name}: the proxy would not load it, so its fallback would route "
                             f"under this name: {exc}") from None
    return {**options, "model_path": str(path.resolve()) if absolute else str(path)}


def check(policies: Sequence[str], policy_options: Mapping[str, Any]) -> None:
    """ValueError naming the first bad policy name, or options given for no listed policy
    (a mistyped label must not be silently ignored)."""
    from policies.registry import PolicyError, resolve

    if not policies:
        raise ValueError("--policies is empty")
    for name in policies:
        kind, at, label = name.partition("@")
        if at and not label:
            raise ValueError(f"policy {name!r}: a label must follow '@' (KIND@LABEL)")
        try:
            resolve(kind)
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
    listed = {*policies, *(policy_kind(p) for p in policies)}
    for key, value in policy_options.items():
        if key not in listed:
            raise ValueError(f"--policy-options has options for {key!r}, which is not in --policies "
                             f"({', '.join(policies)})")
        if not isinstance(value, Mapping):
            raise ValueError(f"--policy-options[{key!r}]: expected an object of options")


def resolve(policies: Sequence[str], policy_options: Mapping[str, Any], *, absolute: bool = False
            ) -> dict[str, dict[str, Any]]:
    """Each policy name's final options, checked once (ValueError says what is wrong): for
    commands whose proxies share one set of options (bench overhead, bench instructions)."""
    check(policies, policy_options)
    return {name: check_model_file(name, options_for(name, policy_options), absolute=absolute)
            for name in policies}
