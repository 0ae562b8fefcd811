"""The `foretell` command as a newcomer uses it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

FORETELL = [sys.executable, "-m", "proxy.cli"]


def _run(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FORETELL, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout_s)


def test_check_config_accepts_the_shipped_config() -> None:
    done = _run("check-config", "config.yaml")
    assert done.returncode == 0, done.stderr
    assert "kind: p2c_peak_ewma" in done.stdout
    assert "retry_on:" in done.stdout  # the effective config, defaults included


@pytest.mark.parametrize(("text", "field", "problem"), [
    ("backends: ['http://127.0.0.1:1']\nlisten: {port: 99999}\n", "listen.port", "less than or equal"),
    ("backends: ['ftp://x']\n", "clusters.default.backends.0.url", "http:// or https://"),
    ("backends: ['http://127.0.0.1:1']\ntimeouts: {connect_s: -1}\n", "timeouts.connect_s", "greater than"),
    ("backends: ['http://127.0.0.1:1']\nlistn: {}\n", "listn", "Extra inputs are not permitted"),
    ("backends: ['http://127.0.0.1:1']\npolicy: {kind: nope}\n", "clusters.default.policy", "no such policy"),
    ("backends: ['http://127.0.0.1:1']\npolicy: {kind: consistent_hash, colour: red}\n",
     "clusters.default.policy", "colour"),
    ("backends: ['http://127.0.0.1:1']\npolicy: {kind: explore, base: nonsense}\n",
     "clusters.default.policy.base", "no such policy 'nonsense'"),
    ("backends: ['http://127.0.0.1:1']\npolicy: {kind: onnx_latency, fallback: onnx_latency}\n",
     "clusters.default.policy.fallback", "must be a heuristic"),
    ("backends: ['http://127.0.0.1:1']\nlisten: {tls: {cert_file: /no/cert.pem, key_file: /no/key.pem}}\n",
     "listen.tls.cert_file", "cannot read /no/cert.pem: No such file or directory"),
    ("backends: ['http://127.0.0.1:1']\nforecast: {enabled: true, coefficients_path: /no/coef.json}\n",
     "forecast.coefficients_path", "no such coefficients file"),
    ("routes: [{cluster: missing}]\nbackends: ['http://127.0.0.1:1']\n",
     "routes.0.cluster", "unknown cluster"),
    ("listen: [\n", "", "not valid YAML"),
    ("backends: ['http://127.0.0.1:1']\nlisten: {port: 1}\nlisten: {port: 2}\n", "line 3",
     "duplicate key 'listen'"),
])
def test_check_config_names_the_bad_field(tmp_path: Path, text: str, field: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    done = _run("check-config", str(path))
    assert done.returncode == 2
    assert str(path) in done.stderr
    assert field in done.stderr and problem in done.stderr, done.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize(("content", "problem"), [
    pytest.param(b"backends: ['http://127.0.0.1:1']\n# \xff\n", "not UTF-8 text: byte 0xff at line 2",
                 id="not-utf8"),
    pytest.param(b"[" * 5000, "nested more than 100 levels deep", id="deep"),
])
def test_an_unreadable_config_is_exit_2_without_a_traceback(tmp_path: Path, command: str, content: bytes,
                                                             problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    done = _run(*([command, str(path)] if command == "check-config" else [command, "--config", str(path)]))
    assert done.returncode == 2, done.stderr
    assert str(path) in done.stderr and problem in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_serve_refuses_what_check_config_refuses_with_the_same_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("backends: ['http://127.0.0.1:1']\npolicy: {kind: explore, base_options: {bogus: 1}}\n")
    checked, served = _run("check-config", str(path)), _run("serve", "--config", str(path))
    assert checked.returncode == served.returncode == 2, served.stderr
    assert f"{path}: invalid config" in served.stderr
    assert "clusters.default.policy.base_options.bogus: Extra inputs are not permitted" in served.stderr
    assert checked.stderr == served.stderr


@pytest.mark.parametrize("taken", ["listen", "admin"])
def test_a_port_in_use_at_start_names_the_address(tmp_path: Path, taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"listen": 0, "admin": 0, taken: port}
        path = tmp_path / "taken.yaml"
        path.write_text(f"backends: ['http://127.0.0.1:1']\nlisten: {{port: {ports['listen']}}}\n"
                        f"admin: {{port: {ports['admin']}}}\n")
        done = _run("serve", "--config", str(path))
    assert done.returncode == 1
    assert (f"cannot start: cannot bind {taken} address 127.0.0.1:{port} ({taken}.host, {taken}.port): "
            "Address already in use") in done.stderr, done.stderr


def test_a_host_name_that_does_not_resolve_is_named_at_start(tmp_path: Path) -> None:
    path = tmp_path / "dns.yaml"
    # .invalid never resolves (RFC 6761); check-config does not look names up.
    path.write_text("backends: ['http://127.0.0.1:1']\nlisten: {host: no-such-host.invalid, port: 0}\n"
                    "admin: {port: 0}\n")
    assert _run("check-config", str(path)).returncode == 0
    done = _run("serve", "--config", str(path))
    assert done.returncode == 1
    assert "cannot start: cannot resolve listen.host 'no-such-host.invalid'" in done.stderr, done.stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    done = _run("serve", "--config", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    assert "nope.yaml: cannot read" in done.stderr


def _demo_config(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """The shipped config's fleet shape on ports this test owns, and those ports."""
    from tests.support import free_port

    config = (ROOT / "config.yaml").read_text()
    ports = {old: free_port() for old in ("8080", "9901", "9101", "9102", "9103", "9104")}
    for old, new in ports.items():
        config = config.replace(old, str(new))
    path = tmp_path / "demo.yaml"
    path.write_text(config)
    return path, ports


def test_demo_refuses_a_fleet_port_another_process_listens_on(tmp_path: Path) -> None:
    import socket

    path, ports = _demo_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["9102"]))
        taken.listen()
        done = _run("demo", "--config", str(path), "--duration-s", "3", timeout_s=60)
    assert done.returncode == 1
    assert f"backend sim-1: 127.0.0.1:{ports['9102']} is already in use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_demo_routes_traffic_and_stops_by_itself(tmp_path: Path) -> None:
    path, _ = _demo_config(tmp_path)
    done = _run("demo", "--config", str(path), "--duration-s", "7", timeout_s=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Foretell is routing on" in done.stdout
    assert "demo traffic:" in done.stdout and " 0 failed" in done.stdout
    for backend in ("sim-0", "sim-1", "sim-2", "sim-3"):
        assert backend in done.stdout
    assert "demo stopped" in done.stdout
