"""`foretell bench overhead`: requests/s, latency and CPU per request, proxy by proxy.

Every proxy stands in front of the same backends and is driven by wrk, one
after the other, in one run:
- direct: wrk straight at one backend (the ceiling, no proxy);
- nginx (1 worker, least_conn, keep-alive upstream pool);
- haproxy (1 thread, leastconn, connection reuse);
- minimal: bench/minimal_proxy.py, 60 lines of aiohttp + uvloop (the floor for Python);
- foretell with each policy asked for (1 worker, default health).

The proxy under test is pinned to CPU 1 (taskset); wrk and the backends
share CPU 0. The backends are one nginx process serving a fixed 2-byte
answer on 4 ports: the cheapest server available, so the backend is not the
bottleneck (direct-to-backend runs several times faster than any proxy).
CPU per request is the proxy processes' user+system time over the
measured run divided by the requests wrk completed. For foretell, the
objects its cyclic garbage collector freed over the run (the
`python_gc_objects_collected_total` counters on its admin /metrics) are
divided the same way: garbage that reference counting cannot free costs
collections, which scan every young object.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import free_ports, port_accepts
from bench.process import stop_process, tree_cpu_s
from bench.variants import policy_kind

N_BACKENDS = 4
PROXY_CPU = 1
CLIENT_CPU = 0
WARMUP_S = 2.0
READY_TIMEOUT_S = 20.0

T = TypeVar("T")


class OverheadError(RuntimeError):
    pass


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float | None
    requests: int
    errors: int
    gc_objects_per_req: float | None = None  # foretell only: freed by the cyclic GC


def _which(tool: str) -> str | None:
    return shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}")
                                  else None)


def ensure_tools(install: bool) -> None:
    missing = [t for t in ("nginx", "haproxy", "wrk", "taskset") if _which(t) is None]
    if not missing:
        return
    if not install:
        raise OverheadError(f"missing tools: {', '.join(missing)} (run bench/install_tools.sh)")
    script = Path(__file__).with_name("install_tools.sh")
    rc = subprocess.call(["sh", str(script)])
    still = [t for t in ("nginx", "haproxy", "wrk", "taskset") if _which(t) is None]
    if rc != 0 or still:
        raise OverheadError(f"could not install: {', '.join(still) or 'see apt-get output'}")


def _nginx_conf(workdir: Path, body: str) -> str:
    temp = "\n".join(f"    {d}_temp_path {workdir}/{d};"
                     for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"worker_processes 1;\ndaemon off;\npid {workdir}/nginx.pid;\n"
            f"error_log {workdir}/error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "http {\n    access_log off;\n" + temp + "\n" + body + "}\n")


def backend_nginx_conf(workdir: Path, ports: Sequence[int]) -> str:
    servers = "".join(
        f"    server {{ listen 127.0.0.1:{p}; keepalive_requests 1000000;\n"
        f"        location / {{ add_header x-backend-id be{i}; return 200 'ok'; }} }}\n"
        for i, p in enumerate(ports))
    return _nginx_conf(workdir, servers)


def proxy_nginx_conf(workdir: Path, port: int, backends: Sequence[int]) -> str:
    ups = "".join(f"        server 127.0.0.1:{p};\n" for p in backends)
    body = ("    upstream be {\n        least_conn;\n" + ups +
            "        keepalive 64;\n        keepalive_requests 1000000;\n    }\n"
            f"    server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;\n"
            "        location / { proxy_pass http://be; proxy_http_version 1.1;\n"
            "            proxy_set_header Connection \"\"; } }\n")
    return _nginx_conf(workdir, body)


def haproxy_conf(port: int, backends: Sequence[int]) -> str:
    servers = "".join(f"    server s{i} 127.0.0.1:{p}\n" for i, p in enumerate(backends))
    return ("global\n    nbthread 1\n    maxconn 4000\n"
            "defaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n"
            "    timeout server 30s\n    http-reuse always\n    option http-keep-alive\n"
            f"frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n"
            "backend be\n    balance leastconn\n" + servers)


def foretell_conf(port: int, admin_port: int, backends: Sequence[int], policy: str,
                  options: dict[str, object] | None = None) -> str:
    cfg = {"listen": {"host": "127.0.0.1", "port": port},
           "admin": {"host": "127.0.0.1", "port": admin_port},
           "workers": 1,
           "backends": [{"id": f"be{i}", "url": f"http://127.0.0.1:{p}"}
                        for i, p in enumerate(backends)],
           "policy": {"kind": policy, **(options or {})}}
    return yaml.safe_dump(cfg, sort_keys=False)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise OverheadError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> tuple[float, float, float, int, int]:
    """(requests/s, p50 ms, p99 ms, requests, errors) from `wrk --latency` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p50 and p99 and total):
        raise OverheadError(f"cannot parse wrk output:\n{out}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    return float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), int(total.group(1)), errors


class _Proc:
    """A started process, its log, stopped by PID."""

    def __init__(self, cmd: Sequence[str], log: Path, cpu: int | None) -> None:
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.log = log
        self._fh = log.open("wb")
        env = dict(os.environ, OMP_NUM_THREADS="1", FORETELL_LOG_LEVEL="WARNING")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.cmd = " ".join([*pin, *cmd])
        self.proc = subprocess.Popen([*pin, *cmd], stdin=subprocess.DEVNULL, stdout=self._fh,
                                     stderr=subprocess.STDOUT, env=env)

    def wait_port(self, port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OverheadError(f"{self.cmd} exited with {self.proc.returncode}:\n"
                                    f"{self.log.read_text(errors='replace')[-2000:]}")
            if port_accepts("127.0.0.1", port):
                return
            time.sleep(0.05)
        raise OverheadError(f"{self.cmd}: port {port} not open within {timeout_s:.0f} s")

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        self._fh.close()


def _wrk(url: str, duration_s: float, connections: int) -> str:
    cmd = ["taskset", "-c", str(CLIENT_CPU), _which("wrk") or "wrk", "-t1",
           f"-c{connections}", f"-d{duration_s:g}s", "--latency", "--timeout", "2s", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 30)
    if done.returncode != 0:
        raise OverheadError(f"wrk failed: {done.stderr[-1000:]}")
    return done.stdout


def gc_collected(metrics_url: str) -> float:
    """Objects a Python process's cyclic GC has freed so far, all generations (from its
    Prometheus text)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "python_gc_objects_collected":
            return sum(sample.value for sample in family.samples)
    raise OverheadError(f"{metrics_url}: no python_gc_objects_collected_total")


def measure(name: str, proc: _Proc | None, url: str, duration_s: float,
            connections: int, metrics_url: str | None = None) -> Result:
    _wrk(url, WARMUP_S, connections)  # warm pools and caches
    gc0 = gc_collected(metrics_url) if metrics_url else 0.0
    cpu0 = proc.cpu_s() if proc else 0.0
    out = _wrk(url, duration_s, connections)
    cpu1 = proc.cpu_s() if proc else 0.0
    gc1 = gc_collected(metrics_url) if metrics_url else 0.0
    rps, p50, p99, total, errors = parse_wrk(out)
    cpu = (cpu1 - cpu0) / total * 1e6 if proc and total else None
    gc = (gc1 - gc0) / total if metrics_url and total else None
    return Result(name, rps, p50, p99, cpu, total, errors, gc)


def table(results: Sequence[Result], connections: int, duration_s: float, repeats: int = 1) -> str:
    nginx = next((r for r in results if r.name == "nginx"), None)
    minimal = next((r for r in results if r.name.startswith("minimal")), None)
    lines = [f"wrk -t1 -c{connections} -d{duration_s:g}s; proxy pinned to CPU {PROXY_CPU}, "
             f"wrk and backends (nginx, static 200) on CPU {CLIENT_CPU}; "
             f"median of {repeats} interleaved round(s), each starting one proxy later",
             "",
             "| proxy | requests/s | p50 ms | p99 ms | proxy CPU µs/req | errors "
             "| req/s ÷ nginx | CPU/req ÷ nginx | CPU/req ÷ minimal | cyclic GC objects/req |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        cpu = "—" if r.cpu_us_per_req is None else f"{r.cpu_us_per_req:.1f}"
        rr = f"{r.rps / nginx.rps:.3f}" if nginx else "—"
        cr = (f"{r.cpu_us_per_req / nginx.cpu_us_per_req:.1f}"
              if nginx and nginx.cpu_us_per_req and r.cpu_us_per_req else "—")
        cm = (f"{r.cpu_us_per_req / minimal.cpu_us_per_req:.2f}"
              if minimal and minimal.cpu_us_per_req and r.cpu_us_per_req else "—")
        gc = "—" if r.gc_objects_per_req is None else f"{r.gc_objects_per_req:.2f}"
        lines.append(f"| {r.name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {cpu} "
                     f"| {r.errors} | {rr} | {cr} | {cm} | {gc} |")
    return "\n".join(lines)


def paired_ratios(runs: Mapping[str, Sequence[Result]], base: str) -> str:
    """Each proxy's requests/s and CPU per request over `base`'s in the same round.

    Neighbours in time, so a slow drift of the shared machine cancels out of each
    ratio; the median of those is steadier than a ratio of medians, and the range
    shows how far one round can stray. Empty with fewer than two rounds.
    """
    ref = runs.get(base, ())
    if len(ref) < 2:
        return ""

    def spread(values: Sequence[float], digits: int) -> str:
        if not values:
            return "—"
        return (f"{statistics.median(values):.{digits}f} "
                f"[{min(values):.{digits}f} to {max(values):.{digits}f}]")

    lines = [f"Paired with {base}, round by round: median [min to max] over {len(ref)} rounds", "",
             f"| proxy | req/s ÷ {base} | CPU/req ÷ {base} |", "|---|---:|---:|"]
    for name, rounds in runs.items():
        if name == base or len(rounds) != len(ref):
            continue
        rps = [r.rps / b.rps for r, b in zip(rounds, ref, strict=True) if b.rps]
        cpu = [r.cpu_us_per_req / b.cpu_us_per_req for r, b in zip(rounds, ref, strict=True)
               if r.cpu_us_per_req and b.cpu_us_per_req]
        lines.append(f"| {name} | {spread(rps, 3)} | {spread(cpu, 2)} |")
    return "\n".join(lines)


def median_result(runs: Sequence[Result]) -> Result:
    """Field-wise median of repeated runs of one proxy."""
    cpus = [r.cpu_us_per_req for r in runs if r.cpu_us_per_req is not None]
    gcs = [r.gc_objects_per_req for r in runs if r.gc_objects_per_req is not None]
    return Result(runs[0].name, statistics.median(r.rps for r in runs),
                  statistics.median(r.p50_ms for r in runs), statistics.median(r.p99_ms for r in runs),
                  statistics.median(cpus) if cpus else None,
                  sum(r.requests for r in runs), sum(r.errors for r in runs),
                  statistics.median(gcs) if gcs else None)


def round_order(proxies: Sequence[T], round_index: int) -> list[T]:
    """The order of one round: each round starts one proxy later than the one before, so
    over len(proxies) rounds every proxy runs once in every position (a shared machine
    that is slower early or late in a round does not always hit the same proxy)."""
    k = round_index % len(proxies) if proxies else 0
    return [*proxies[k:], *proxies[:k]]


def run_overhead(policies: Sequence[str], *, duration_s: float = 10.0, connections: int = 32,
                 out: Path | None = None, install: bool = True, repeats: int = 1,
                 policy_options: dict[str, dict[str, object]] | None = None,
                 references: bool = True) -> int:
    """`policy_options`: each policy name's final options (bench.variants.resolve).
    Without `references`, only foretell's policies run (no direct, nginx, haproxy or
    minimal proxy): shorter rounds, so the runs compared are closer in time."""
    if (os.cpu_count() or 1) < 2:
        raise OverheadError("needs 2 CPUs: the proxy on one, wrk and backends on the other")
    ensure_tools(install)
    nginx_bin = _which("nginx") or "nginx"
    haproxy_bin = _which("haproxy") or "haproxy"
    work = Path(tempfile.mkdtemp(prefix="foretell-overhead-"))
    ports = free_ports(N_BACKENDS + 2)
    be_ports, proxy_port, admin_port = ports[:N_BACKENDS], ports[-2], ports[-1]
    runs: dict[str, list[Result]] = {}
    procs: list[_Proc] = []

    def start(name: str, cmd: Sequence[str], cpu: int | None, port: int) -> _Proc:
        p = _Proc(cmd, work / f"{name}.log", cpu)
        procs.append(p)
        p.wait_port(port)
        return p

    def one(name: str, cmd: Sequence[str], metrics_url: str | None) -> None:
        print(f"overhead: {name} ...", file=sys.stderr, flush=True)
        p = start(name, cmd, PROXY_CPU, proxy_port)
        try:
            runs.setdefault(name, []).append(
                measure(name, p, f"http://127.0.0.1:{proxy_port}/", duration_s, connections,
                        metrics_url))
        finally:
            p.stop()
            procs.remove(p)
        time.sleep(0.5)  # let the port leave TIME_WAIT pressure behind

    try:
        be_dir = work / "backend"
        be_dir.mkdir()
        (be_dir / "nginx.conf").write_text(backend_nginx_conf(be_dir, be_ports))
        start("backends", [nginx_bin, "-p", str(be_dir), "-c", str(be_dir / "nginx.conf"),
                           "-e", str(be_dir / "error.log")], CLIENT_CPU, be_ports[-1])
        # (name, command, its /metrics or None): only foretell has an admin port.
        proxies: list[tuple[str, list[str], str | None]] = []
        if references:
            print("overhead: direct to one backend ...", file=sys.stderr, flush=True)
            runs["direct (no proxy)"] = [measure("direct (no proxy)", None,
                                                 f"http://127.0.0.1:{be_ports[0]}/", duration_s,
                                                 connections)]
            px_dir = work / "nginx"
            px_dir.mkdir()
            (px_dir / "nginx.conf").write_text(proxy_nginx_conf(px_dir, proxy_port, be_ports))
            (work / "haproxy.cfg").write_text(haproxy_conf(proxy_port, be_ports))
            proxies += [
                ("nginx", [nginx_bin, "-p", str(px_dir), "-c", str(px_dir / "nginx.conf"),
                           "-e", str(px_dir / "error.log")], None),
                ("haproxy", [haproxy_bin, "-db", "-f", str(work / "haproxy.cfg")], None),
                ("minimal (aiohttp+uvloop)",
                 [sys.executable, "-m", "bench.minimal_proxy", "--port", str(proxy_port),
                  *[f"http://127.0.0.1:{p}" for p in be_ports]], None),
            ]
        foretell_metrics = f"http://127.0.0.1:{admin_port}/metrics"
        for pol in policies:
            cfg = work / f"foretell-{pol}.yaml"
            cfg.write_text(foretell_conf(proxy_port, admin_port, be_ports, policy_kind(pol),
                                         (policy_options or {}).get(pol)))
            proxies.append((f"foretell {pol}", [sys.executable, "-m", "proxy", "--config", str(cfg)],
                            foretell_metrics))
        # Rounds interleave the proxies so slow drifts of a shared machine hit all alike.
        for r in range(repeats):
            for name, cmd, metrics_url in round_order(proxies, r):
                one(name, cmd, metrics_url)
    finally:
        for p in reversed(procs):
            p.stop()
    results = [median_result(r) for r in runs.values()]
    text = table(results, connections, duration_s, repeats)
    paired = paired_ratios(runs, f"foretell {policies[0]}") if policies else ""
    if paired:
        text += "\n\n" + paired
    print(text)
    if out is not None:
        options = f" --policy-options {shlex.quote(json.dumps(policy_options))}" if policy_options else ""
        no_refs = "" if references else " --no-references"
        out.write_text(f"# Proxy overhead\n\n`foretell bench overhead --policies "
                       f"{','.join(policies)} --duration-s {duration_s:g} "
                       f"--connections {connections} --repeats {repeats}{no_refs}{options}`\n\n{text}\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0
