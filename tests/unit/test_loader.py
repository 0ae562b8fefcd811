"""proxy/loader.py: what check-config, start-up and reload all check beyond the models."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.config import ConfigError, parse_config
from proxy.forecast import FORMAT_NAME, FORMAT_VERSION
from proxy.loader import validate
from tests.unit.file_support import mode_000_is_readable

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


def _file_problems(**sections: Any) -> list[str]:
    """The problems validate finds (none: [])."""
    config = parse_config({**({} if "clusters" in sections else {"backends": BACKENDS}), **sections},
                          "test.yaml")
    try:
        validate(config, "test.yaml")
    except ConfigError as exc:
        return [line.strip() for line in str(exc).splitlines()[1:]]
    return []


def _cert(tmp_path: Path, ca: trustme.CA, tag: str) -> tuple[str, str]:
    cert = ca.issue_cert("localhost")
    cert_file, key_file = tmp_path / f"{tag}.crt", tmp_path / f"{tag}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return str(cert_file), str(key_file)


def test_listen_certificate_and_key_must_be_readable_and_match(tmp_path: Path) -> None:
    assert _file_problems(listen={"tls": {"cert_file": str(tmp_path / "no.crt"),
                                                    "key_file": str(tmp_path / "no.key")}}) == [
        f"listen.tls.cert_file: cannot read {tmp_path}/no.crt: No such file or directory",
        f"listen.tls.key_file: cannot read {tmp_path}/no.key: No such file or directory"]
    ca = trustme.CA()
    (cert, key), (_, other_key) = _cert(tmp_path, ca, "a"), _cert(tmp_path, ca, "b")
    assert _file_problems(listen={"tls": {"cert_file": cert, "key_file": key}}) == []
    [problem] = _file_problems(listen={"tls": {"cert_file": cert, "key_file": other_key}})
    assert problem.startswith(f"listen.tls: cannot load certificate {cert} with key {other_key}")


def test_an_upstream_ca_file_must_hold_certificates(tmp_path: Path) -> None:
    def problems(ca_file: Path) -> list[str]:
        return _file_problems(clusters={
            "a": {"backends": ["https://127.0.0.1:1"], "tls": {"ca_file": str(ca_file)}}})

    assert problems(tmp_path / "ca.pem") == [
        f"clusters.a.tls.ca_file: cannot read {tmp_path}/ca.pem: No such file or directory"]
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    [problem] = problems(tmp_path / "ca.pem")
    assert problem.startswith(f"clusters.a.tls.ca_file: no CA certificates in {tmp_path}/ca.pem")
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    assert problems(tmp_path / "ca.pem") == []
    # verify: false never reads it.
    assert _file_problems(clusters={"a": {"backends": ["https://127.0.0.1:1"], "tls": {
        "verify": False, "ca_file": str(tmp_path / "missing.pem")}}}) == []


def test_output_files_need_a_directory_they_can_be_written_in(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert _file_problems(access_log={"enabled": True, "path": f"{missing}/access.log"}) == [
        f"access_log.path: cannot create {missing}/access.log: no directory {missing}"]
    assert _file_problems(forecast={"enabled": True, "counts_path": f"{missing}/counts.csv"}) == [
        f"forecast.counts_path: cannot create {missing}/counts.csv: no directory {missing}"]
    assert _file_problems(health={"anomaly": {"record_path": f"{missing}/rows.jsonl"}}) == [
        f"clusters.default.health.anomaly.record_path: cannot create {missing}/rows.jsonl: "
        f"no directory {missing}"]
    assert _file_problems(access_log={"enabled": True, "path": str(tmp_path)}) == [
        f"access_log.path: cannot write {tmp_path}: Is a directory"]
    # Off (or standard output): not checked.
    assert _file_problems(access_log={"enabled": False, "path": f"{missing}/access.log"}) == []
    assert _file_problems(access_log={"enabled": True, "path": "-"}) == []


def test_the_telemetry_directory_must_be_creatable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert _file_problems(telemetry={"enabled": True, "path": str(tmp_path / "file" / "t")}) == [
        f"telemetry.path: {tmp_path}/file is not a directory"]
    if Path("/proc/self").is_dir():
        [problem] = _file_problems(telemetry={"enabled": True, "path": "/proc/telemetry"})
        assert problem.startswith("telemetry.path: cannot create /proc/telemetry (in /proc: ")


def test_validation_writes_nothing(tmp_path: Path) -> None:
    assert _file_problems(
        telemetry={"enabled": True, "path": str(tmp_path / "t" / "u")},
        access_log={"enabled": True, "path": str(tmp_path / "access.log")},
        forecast={"enabled": True, "counts_path": str(tmp_path / "counts.csv")}) == []
    assert list(tmp_path.iterdir()) == []


def test_forecast_coefficients_are_loaded_when_the_forecast_is_on(tmp_path: Path) -> None:
    path = tmp_path / "coef.json"
    [problem] = _file_problems(forecast={"enabled": True, "coefficients_path": str(path)})
    assert problem == f"forecast.coefficients_path: {path}: no such coefficients file " \
                      "(create it with `foretell train forecast`)"
    path.write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "interval_s": 5.0,
                                "a": 0.0, "b": 1.0, "c": 0.0}))
    [problem] = _file_problems(forecast={"enabled": True, "coefficients_path": str(path)})
    assert "fitted for 5 s intervals but forecast.interval_s is 10" in problem
    assert _file_problems(forecast={"enabled": True, "coefficients_path": str(path),
                                              "interval_s": 5.0}) == []
    assert _file_problems(forecast={"enabled": False, "coefficients_path": f"{tmp_path}/no"}) == []


@pytest.mark.parametrize(("kind", "problem"), [
    ("...", "kind: '...' is not a built-in policy name nor a dotted path"),  # was a TypeError
    ("a b.c", "kind: 'a b.c' is not a built-in policy name nor a dotted path"),
    ("tests.unit.test_loader_no_such_module.P", "kind: policy 'tests.unit.test_loader_no_such_module.P': "
                                                 "cannot import tests.unit.test_loader_no_such_module"),
])
def test_a_kind_that_cannot_name_a_class_is_a_problem_not_a_crash(kind: str, problem: str) -> None:
    [found] = _problems({"kind": kind})
    assert found.startswith(problem), found


def test_a_users_module_that_fails_on_import_is_a_problem(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "boom_policy.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _problems({"kind": "boom_policy.Boom"}) == [
        "kind: policy 'boom_policy.Boom': importing boom_policy failed: RuntimeError: boom"]


def test_a_fifo_as_an_output_file_is_not_opened(tmp_path: Path) -> None:
    """Opening a FIFO nobody reads blocks: check-config hung, and a reload's thread for good."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    assert _file_problems(access_log={"enabled": True, "path": str(fifo)}) == []
    # One the proxy reads whole is refused: reading it would block just the same.
    assert _file_problems(clusters={"a": {"backends": ["https://127.0.0.1:1"],
                                          "tls": {"ca_file": str(fifo)}}}) == [
        f"clusters.a.tls.ca_file: {fifo} is not a regular file"]
    assert _file_problems(health={"anomaly": {"model_path": str(fifo)}}) == [
        f"clusters.default.health.anomaly.model_path: {fifo} is not a regular file"]


@pytest.mark.skipif(mode_000_is_readable(), reason="this process (root) may search any directory")
def test_a_directory_it_may_not_search_is_a_named_problem_not_a_crash(tmp_path: Path) -> None:
    """Path.exists() raises PermissionError there (Python 3.11): a traceback, exit 1."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        [problem] = _file_problems(telemetry={"enabled": True, "path": str(locked / "sub" / "t")})
        assert problem.startswith(f"telemetry.path: cannot create {locked}/sub/t (in {locked}: ")
        [problem] = _file_problems(access_log={"enabled": True, "path": str(locked / "a.log")})
        assert problem.startswith("access_log.path: cannot create")
    finally:
        locked.chmod(0o700)
