"""bench.variants: KIND@LABEL names, their merged options, and the checks on both."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import variants


def test_a_label_keeps_its_kind_and_puts_its_options_on_top() -> None:
    options = {"p2c_peak_ewma": {"failure_penalty": 5.0, "slow_start_s": 10.0},
               "p2c_peak_ewma@no_penalty": {"failure_penalty": 0.0}}
    assert variants.policy_kind("p2c_peak_ewma@no_penalty") == "p2c_peak_ewma"
    assert variants.policy_kind("hcl") == "hcl"
    assert variants.options_for("p2c_peak_ewma", options) == {"failure_penalty": 5.0,
                                                              "slow_start_s": 10.0}
    assert variants.options_for("p2c_peak_ewma@no_penalty", options) == {"failure_penalty": 0.0,
                                                                         "slow_start_s": 10.0}
    assert variants.options_for("hcl", options) == {}


@pytest.mark.parametrize(("policies", "options", "message"), [
    ([], {}, "--policies is empty"),
    (["hcl@"], {}, "a label must follow '@'"),
    (["nope@x"], {}, "no such policy"),
    (["hcl", "hcl@b"], {"hcl@typo": {}}, "'hcl@typo', which is not in --policies"),
    (["hcl"], {"round_robin": {}}, "'round_robin', which is not in --policies"),
    (["hcl"], {"hcl": 3}, "expected an object of options"),
])
def test_bad_names_and_options_for_no_listed_policy_are_refused(
        policies: list[str], options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.check(policies, options)


def test_options_for_a_kind_or_a_listed_label_pass() -> None:
    variants.check(["hcl", "hcl@b"], {"hcl": {"failure_penalty": 1.0}, "hcl@b": {}})


def test_scenario_placeholder_is_filled_in_every_string() -> None:
    options = {"model_path": "models/{scenario}.onnx", "epsilon": 0.1,
               "fallback_options": {"names": ["{scenario}-a", 3]}}
    assert variants.for_scenario(options, "gray") == {
        "model_path": "models/gray.onnx", "epsilon": 0.1,
        "fallback_options": {"names": ["gray-a", 3]}}


def test_a_learned_policy_without_its_model_file_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="does not exist"):
        variants.check_model_file("onnx_latency@new", {"model_path": str(model)})
    with pytest.raises(ValueError, match="only filled in by bench run"):
        variants.check_model_file("onnx_latency", {"model_path": "models/{scenario}.onnx"})
    model.write_bytes(b"x")  # existence only (the cost benches' @nomodel variants)...
    assert variants.check_model_file("onnx_latency", {"model_path": str(model), "epsilon": 0.1}) == {
        "model_path": str(model), "epsilon": 0.1}
    # ...unless asked to load it (bench run): a table row must be the model's routing.
    with pytest.raises(ValueError, match=r"would not load it.*m\.onnx"):
        variants.check_model_file("onnx_latency", {"model_path": str(model)}, load=True)
    assert variants.check_model_file("hcl", {"failure_penalty": 1.0}) == {"failure_penalty": 1.0}


def test_a_relative_model_path_can_be_made_absolute(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"x")
    options = variants.check_model_file("onnx_latency", {"model_path": "m.onnx"}, absolute=True)
    assert options["model_path"] == str(tmp_path / "m.onnx")


def test_resolve_gives_each_name_its_final_checked_options(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    options = {"onnx_latency": {"model_path": str(model)}, "onnx_latency@eps": {"epsilon": 0.1}}
    assert variants.resolve(["hcl", "onnx_latency", "onnx_latency@eps"], options) == {
        "hcl": {}, "onnx_latency": {"model_path": str(model)},
        "onnx_latency@eps": {"model_path": str(model), "epsilon": 0.1}}
    with pytest.raises(ValueError, match="not in --policies"):
        variants.resolve(["hcl"], options)
