"""bench.overhead: wrk output parsing, the generated nginx / haproxy configs, the round order."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bench.overhead import (
    OverheadError,
    Result,
    haproxy_conf,
    paired_ratios,
    parse_wrk,
    proxy_nginx_conf,
    round_order,
    table,
)

WRK_OUT = """Running 10s test @ http://127.0.0.1:8080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   610.12us  201.00us   9.87ms   90.00%
    Req/Sec    52.11k     3.10k   56.00k    80.00%
  Latency Distribution
     50%  580.00us
     75%  650.00us
     90%  720.00us
     99%    1.20ms
  518000 requests in 10.00s, 60.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  51800.00
Transfer/sec:      6.00MB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    rps, p50, p99, total, errors = parse_wrk(WRK_OUT)
    assert rps == 51800.0
    assert p50 == pytest.approx(0.58)
    assert p99 == pytest.approx(1.2)
    assert total == 518000
    assert errors == 7


def test_parse_wrk_refuses_garbage() -> None:
    with pytest.raises(OverheadError, match="cannot parse"):
        parse_wrk("connection refused")


def test_table_gives_ratios_to_nginx() -> None:
    text = table([Result("nginx", 50000, 0.5, 1.0, 20.0, 500000, 0),
                  Result("foretell round_robin", 5000, 5.0, 20.0, 200.0, 50000, 0, 13.0)], 32, 10)
    row = next(line for line in text.splitlines() if line.startswith("| foretell"))
    assert "| 0.100 | 10.0 |" in row
    assert row.endswith("| 13.00 |")  # cyclic GC objects per request: foretell only
    nginx = next(line for line in text.splitlines() if line.startswith("| nginx"))
    assert nginx.endswith("| — |")


def test_proxy_configs_name_every_backend_and_least_conn(tmp_path: Path) -> None:
    ports = [9001, 9002, 9003]
    ngx = proxy_nginx_conf(tmp_path, 8080, ports)
    assert "least_conn;" in ngx and "keepalive 64;" in ngx
    assert all(f"server 127.0.0.1:{p};" in ngx for p in ports)
    hap = haproxy_conf(8080, ports)
    assert "balance leastconn" in hap and "nbthread 1" in hap
    assert all(f"127.0.0.1:{p}" in hap for p in ports)


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="nginx not installed (bench/install_tools.sh installs it)")
def test_generated_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = tmp_path / "nginx.conf"
    conf.write_text(proxy_nginx_conf(tmp_path, 8080, [9001, 9002]))
    done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf),
                           "-e", str(tmp_path / "error.log")], capture_output=True, text=True,
                          timeout=20)
    assert done.returncode == 0, done.stderr


def _r(name: str, rps: float, cpu: float | None) -> Result:
    return Result(name, rps, 1.0, 2.0, cpu, int(rps), 0)


def test_paired_ratios_are_taken_round_by_round() -> None:
    # The machine slows down between rounds. B's ratio of medians (6,400 / 8,000 = 0.8)
    # is its worst round; paired round by round its median is 0.9.
    runs = {"foretell a": [_r("foretell a", 10_000, 100.0), _r("foretell a", 8_000, 125.0),
                           _r("foretell a", 5_000, 200.0)],
            "foretell b": [_r("foretell b", 9_500, 105.0), _r("foretell b", 6_400, 150.0),
                           _r("foretell b", 4_500, 220.0)],
            "direct (no proxy)": [_r("direct (no proxy)", 70_000, None)]}
    text = paired_ratios(runs, "foretell a")
    assert "over 3 rounds" in text
    assert "| foretell b | 0.900 [0.800 to 0.950] | 1.10 [1.05 to 1.20] |" in text
    assert "direct" not in text  # one round only: nothing to pair
    assert paired_ratios({"foretell a": runs["foretell a"][:1]}, "foretell a") == ""


def test_rounds_rotate_so_every_proxy_runs_in_every_position() -> None:
    proxies = ["nginx", "haproxy", "foretell a", "foretell b"]
    rounds = [round_order(proxies, r) for r in range(len(proxies))]
    assert rounds[0] == proxies
    for position in range(len(proxies)):
        assert sorted(r[position] for r in rounds) == sorted(proxies)
    assert all(sorted(r) == sorted(proxies) for r in rounds)
    assert round_order(proxies, len(proxies)) == proxies
    assert round_order([], 3) == []
