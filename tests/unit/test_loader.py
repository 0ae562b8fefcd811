"""proxy/loader.py: what check-config, start-up and reload all check beyond the models."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError, parse_config
from proxy.loader import validate

BACKENDS = ["http://127.0.0.1:1"]
KNOWN = ("(known: consistent_hash, explore, hcl, least_request, onnx_latency, p2c_peak_ewma, random, "
         "round_robin)")
LEARNED = "is a learned policy or wraps one"


def _problems(policy: dict[str, Any]) -> list[str]:
    config = parse_config({"backends": BACKENDS, "policy": policy}, "test.yaml")
    with pytest.raises(ConfigError) as info:
        validate(config, "test.yaml")
    first, *lines = str(info.value).splitlines()
    assert first == f"test.yaml: invalid config ({len(lines)} error(s))"
    return [line.strip().removeprefix("clusters.default.policy.") for line in lines]


@pytest.mark.parametrize(("policy", "problem"), [
    ({"kind": "nonsense"}, f"kind: no such policy 'nonsense' {KNOWN}"),
    ({"kind": "explore", "base": "nonsense"}, f"base: no such policy 'nonsense' {KNOWN}"),
    ({"kind": "explore", "base_options": {"bogus": 1}}, "base_options.bogus: Extra inputs are not permitted"),
    ({"kind": "explore", "base": "explore"}, "base: must be another policy than 'explore'"),
    ({"kind": "onnx_latency", "fallback": "nonsense"}, f"fallback: no such policy 'nonsense' {KNOWN}"),
    ({"kind": "onnx_latency", "fallback": "onnx_latency"},
     f"fallback: must be a heuristic; 'onnx_latency' {LEARNED}"),
    ({"kind": "onnx_latency", "fallback": "explore", "fallback_options": {"base": "onnx_latency"}},
     f"fallback: must be a heuristic; 'explore' {LEARNED}"),
    ({"kind": "onnx_latency", "fallback_options": {"bogus": 1}},
     "fallback_options.bogus: Extra inputs are not permitted"),
    ({"kind": "explore", "base": "onnx_latency",
      "base_options": {"fallback": "hcl", "fallback_options": {"d": 1}}},
     "base_options.fallback_options.d: Input should be greater than or equal to 2"),
])
def test_nested_policies_are_validated_with_their_field_path(policy: dict[str, Any], problem: str) -> None:
    assert _problems(policy) == [problem]


def test_every_problem_of_every_cluster_is_listed() -> None:
    config = parse_config({
        "clusters": {"a": {"backends": BACKENDS, "policy": {"kind": "explore", "base": "x"}},
                     "b": {"backends": BACKENDS, "policy": {"kind": "hcl", "d": 1, "q_rif": 2}}},
        "routes": [{"cluster": "a"}]}, "test.yaml")
    with pytest.raises(ConfigError) as info:
        validate(config, "test.yaml")
    lines = str(info.value).splitlines()
    assert lines[0] == "test.yaml: invalid config (3 error(s))"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "clusters.a.policy.base", "clusters.b.policy.d", "clusters.b.policy.q_rif"]


def test_a_learned_policy_may_be_wrapped_and_heuristics_nested() -> None:
    fallback = {"base": "hcl", "base_options": {"d": 3}}
    config = parse_config({"backends": BACKENDS, "policy": {
        "kind": "explore", "base": "onnx_latency",
        "base_options": {"fallback": "explore", "fallback_options": fallback}}})
    assert validate(config, "test.yaml").policy_options["default"].base == "onnx_latency"
