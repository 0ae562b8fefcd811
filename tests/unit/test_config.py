"""proxy/config.py: reading config.yaml, and the models rejecting what the proxy cannot use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, parse_config, read_config

BACKENDS = "backends: ['http://127.0.0.1:1']\n"


def _field_errors(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"backends": ["http://127.0.0.1:1"], **data}, "test.yaml")
    return str(info.value)


def _config_error(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        read_config(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_a_file_that_is_not_utf8_names_the_byte_and_line(tmp_path: Path) -> None:
    message = _config_error(tmp_path, BACKENDS.encode() + b"# caf\xe9\n")
    assert "not UTF-8 text: byte 0xe9 at line 2, column 6" in message


def test_a_deeply_nested_file_is_an_error_not_a_recursion(tmp_path: Path) -> None:
    message = _config_error(tmp_path, "[" * 5000)
    assert "line 1, column 101: nested more than 100 levels deep" in message


def test_a_control_character_is_named_with_its_line(tmp_path: Path) -> None:
    message = _config_error(tmp_path, BACKENDS + "a: \x01\n")
    assert "not valid YAML: line 2, column 4: character #x0001 is not allowed" in message


def test_yaml_errors_say_line_and_column_in_one_line(tmp_path: Path) -> None:
    message = _config_error(tmp_path, "listen: [\n")
    assert "not valid YAML: line 2, column 1: expected the node content" in message
    assert "\n" not in message


def test_a_value_pyyaml_cannot_construct_is_a_config_error(tmp_path: Path) -> None:
    message = _config_error(tmp_path, BACKENDS + "when: 2020-13-45\n")
    assert "not valid YAML: a value cannot be read: month must be in 1..12" in message


def test_a_duplicate_key_is_named_with_both_lines(tmp_path: Path) -> None:
    # PyYAML keeps the last one silently: here the first cluster would vanish.
    text = ("clusters:\n"
            "  a: {backends: ['http://127.0.0.1:1']}\n"
            "  a: {backends: ['http://127.0.0.1:2']}\n")
    message = _config_error(tmp_path, text)
    assert "not valid YAML: line 3, column 3: duplicate key 'a' (first at line 2, column 3)" in message
    assert "listen" in _config_error(tmp_path, BACKENDS + "listen: {port: 1}\nlisten: {port: 2}\n")


def test_a_merged_key_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("clusters:\n"
                    "  a: {backends: ['http://127.0.0.1:1'], health: &h {active: {enabled: false}}}\n"
                    "  b: {backends: ['http://127.0.0.1:2'], health: {<<: *h, active: {rise: 3}}}\n"
                    "routes: [{cluster: a}]\n")
    config = read_config(path)
    assert config.clusters["a"].health.active.enabled is False
    assert config.clusters["b"].health.active.enabled is True
    assert config.clusters["b"].health.active.rise == 3


def test_the_shipped_config_reads() -> None:
    config = read_config(Path(__file__).resolve().parents[2] / "config.yaml")
    assert config.clusters


@pytest.mark.parametrize(("data", "field"), [
    ({"listen": {"port": True}}, "listen.port"),  # was port 1
    ({"admin": {"port": False}}, "admin.port"),
    ({"workers": True}, "workers"),
    ({"listen": {"backlog": 10.5}}, "listen.backlog"),
    ({"retries": {"attempts": "3"}}, "retries.attempts"),
    ({"limits": {"max_body_bytes": True}}, "limits.max_body_bytes"),
    ({"timeouts": {"connect_s": True}}, "timeouts.connect_s"),
    ({"health": {"active": {"rise": True}}}, "clusters.default.health.active.rise"),
    ({"health": {"active": {"expected_statuses": [True]}}},
     "clusters.default.health.active.expected_statuses.0"),
])
def test_true_false_and_strings_are_not_numbers(data: dict[str, Any], field: str) -> None:
    message = _field_errors(data)
    assert f"  {field}: Input should be a valid" in message, message


@pytest.mark.parametrize(("data", "field"), [
    ({"timeouts": {"client_header_s": float("inf")}}, "timeouts.client_header_s"),  # no slowloris guard
    ({"timeouts": {"total_s": float("inf"), "per_try_s": float("inf")}}, "timeouts.total_s"),
    ({"timeouts": {"drain_s": float("nan")}}, "timeouts.drain_s"),
    ({"retries": {"budget": {"percent": float("nan")}}}, "retries.budget.percent"),
    ({"health": {"active": {"interval_s": float("inf")}}}, "clusters.default.health.active.interval_s"),
    ({"health": {"ejection": {"max_ejection_s": float("inf")}}},
     "clusters.default.health.ejection.max_ejection_s"),
    ({"forecast": {"capacity_rps_per_replica": float("inf")}}, "forecast.capacity_rps_per_replica"),
])
def test_durations_and_rates_are_finite(data: dict[str, Any], field: str) -> None:
    message = _field_errors(data)
    assert f"  {field}: Input should be a finite number" in message, message


def test_whole_numbers_still_do_for_seconds() -> None:
    config = parse_config({"backends": ["http://127.0.0.1:1"], "timeouts": {"connect_s": 2}})
    assert config.timeouts.connect_s == 2.0 and isinstance(config.timeouts.connect_s, float)


@pytest.mark.parametrize(("options", "problem"), [
    ({"kind": "hcl", "d": True}, "d: must be a number, not true"),
    ({"kind": "hcl", "q_rif": "0.5"}, "q_rif: must be a number, not '0.5'"),
    ({"kind": "p2c_peak_ewma", "slow_start_s": float("inf")},
     "slow_start_s: Input should be a finite number"),
])
def test_policy_options_are_numbers_and_finite_too(options: dict[str, Any], problem: str) -> None:
    from proxy.loader import validate

    with pytest.raises(ConfigError, match=problem):
        validate(parse_config({"backends": ["http://127.0.0.1:1"], "policy": options}), "test.yaml")


@pytest.mark.parametrize(("data", "field", "problem"), [
    # Appended to the backend URL: every probe failed, the whole cluster panicked.
    ({"health": {"active": {"path": "healthz"}}}, "clusters.default.health.active.path",
     "must start with '/', got 'healthz'"),
    ({"health": {"active": {"expected_statuses": [999]}}},
     "clusters.default.health.active.expected_statuses.0", "less than or equal to 599"),
    ({"health": {"active": {"expected_statuses": [200, 0]}}},
     "clusters.default.health.active.expected_statuses.1", "greater than or equal to 100"),
    ({"health": {"active": {"expected_statuses": []}}},
     "clusters.default.health.active.expected_statuses", "at least 1 item"),
    ({"routes": [{"methods": ["GE T"]}]}, "routes.0.methods", "'GE T' is not an HTTP method"),
    ({"routes": [{"methods": ["GET", ""]}]}, "routes.0.methods", "'' is not an HTTP method"),
    ({"routes": [{"headers": {"x tenant": "a"}}]}, "routes.0.headers", "'x tenant' is not a header name"),
])
def test_values_that_cannot_work_are_refused(data: dict[str, Any], field: str, problem: str) -> None:
    message = _field_errors(data)
    assert f"  {field}: " in message and problem in message, message


def test_methods_and_statuses_that_can_work_pass() -> None:
    route = {"methods": ["get", "PURGE", "M-SEARCH"], "headers": {"X-Tenant": "*"}}
    config = parse_config({"backends": ["http://127.0.0.1:1"], "routes": [route],
                           "health": {"active": {"path": "/ready?deep=1", "expected_statuses": [200, 204]}}})
    assert config.routes[0].methods == ["GET", "PURGE", "M-SEARCH"]
    assert config.clusters["default"].health.active.expected_statuses == [200, 204]


@pytest.mark.parametrize("host", ["not a host!!", "", "[::1]", "-lead.example.com", "a..b", "http://x",
                                  "x" * 64])
def test_a_host_that_cannot_be_one_is_refused_by_its_spelling(host: str) -> None:
    message = _field_errors({"listen": {"host": host}})
    assert f"  listen.host: {host!r} is not an IP address or a host name" in message, message
    assert "admin.host" in _field_errors({"admin": {"host": host}})


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "fe80::1%eth0", "localhost", "svc_a",
                                  "proxy-1.internal.example.com", "example.com.", "no-such-host.invalid"])
def test_addresses_and_names_pass_unresolved(host: str) -> None:
    assert parse_config({"backends": ["http://127.0.0.1:1"], "listen": {"host": host}}).listen.host == host


@pytest.mark.parametrize("url", ["http://not a host!!:80", "http://x..y:80", "https://exa mple.com"])
def test_a_backend_url_host_is_checked_the_same_way(url: str) -> None:
    message = _field_errors({"backends": [url]})
    assert "  clusters.default.backends.0.url: " in message, message
    assert "is not an IP address or a host name" in message


def test_backend_urls_with_addresses_and_names_pass() -> None:
    urls = ["http://[::1]:8000", "http://10.0.0.5:8000", "https://api.internal:8443", "http://svc_b"]
    assert [b.url for b in parse_config({"backends": urls}).clusters["default"].backends] == urls


@pytest.mark.parametrize(("listen", "admin"), [
    ({"port": 9901}, {}),
    ({"host": "0.0.0.0", "port": 8000}, {"host": "127.0.0.1", "port": 8000}),
    ({"host": "::1", "port": 8000}, {"host": "::", "port": 8000}),
    ({"host": "proxy.local", "port": 8000}, {"host": "proxy.local", "port": 8000}),
])
def test_listen_and_admin_cannot_share_a_socket(listen: dict[str, Any], admin: dict[str, Any]) -> None:
    message = _field_errors({"listen": listen, "admin": admin})
    assert "  admin.port: " in message and "is taken by listen" in message, message


@pytest.mark.parametrize(("listen", "admin"), [
    ({"port": 0}, {"port": 0}),  # each gets a free port
    ({"host": "127.0.0.1", "port": 8000}, {"host": "127.0.0.2", "port": 8000}),
    ({"host": "0.0.0.0", "port": 8000}, {"host": "::1", "port": 8000}),
])
def test_listen_and_admin_may_share_a_port_number_on_other_addresses(listen: dict[str, Any],
                                                                      admin: dict[str, Any]) -> None:
    parse_config({"backends": ["http://127.0.0.1:1"], "listen": listen, "admin": admin})


def test_forecast_replicas_range_is_checked() -> None:
    message = _field_errors({"forecast": {"enabled": True, "min_replicas": 50, "max_replicas": 2}})
    assert "  forecast: min_replicas (50) must not exceed max_replicas (2)" in message


def test_a_problem_of_the_whole_config_is_printed_with_the_field_it_names() -> None:
    message = _field_errors({"routes": [{"cluster": "missing"}]})
    assert message.splitlines()[1] == "  routes.0.cluster: unknown cluster 'missing' (known: default)"
