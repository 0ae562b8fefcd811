"""Run scenarios x utilisations x policies x repeats, each against a fresh fleet.

One run: start the scenario's fleet (child processes), write a proxy config
for the policy, start the proxy as a separate process (`python -m proxy
--config FILE`, as a user would), wait until its admin port says /ready,
start the fleet's event timeline and the open-loop load generator at the
same instant, measure the proxy's CPU time over the load, then stop
everything by PID. Policies run in an interleaved order that rotates with
each repeat, with the same seeds, so drift on a shared machine spreads over
all of them rather than biasing one.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

from bench import loadgen
from bench.fleet import Fleet, free_ports
from bench.loadgen import ERR_DEADLINE, LoadSpec, Records
from bench.process import stop_process, tree_cpu_s
from bench.scenarios import Scenario
from bench.variants import for_scenario, options_for, policy_kind

PROXY_READY_TIMEOUT_S = 30.0
# Time between "proxy ready" and the first request: the load generator
# process needs this long to import and connect.
LOAD_LEAD_S = 1.2
WINDOW_S = 1.0  # p99-over-time window
CDF_POINTS = np.concatenate([np.linspace(0, 99, 100), [99.5, 99.9, 99.95, 99.99, 100.0]])


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class RunPlan:
    scenario: Scenario
    utilisation: float
    policy: str
    repeat: int
    duration_s: float
    seed: int
    policy_options: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    # "default": the health settings a user gets; "shadow": passive detectors
    # detect but do not eject, so the table compares routing alone.
    health: str = "default"
    # Merged into the proxy config's top level (e.g. {"telemetry": {...}}).
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.scenario.name} u={self.utilisation:g} {self.policy} #{self.repeat}"


def plan(scenarios: Sequence[Scenario], policies: Sequence[str], *, quick: bool,
         repeats: int, seed: int = 1, health: str = "default",
         policy_options: dict[str, dict[str, Any]] | None = None,
         extra_config: dict[str, Any] | None = None) -> list[RunPlan]:
    """Every run, in execution order: the policy order rotates with each repeat."""
    out = []
    for sc in scenarios:
        utils = sc.quick_utilisations if quick else sc.utilisations
        duration = sc.quick_duration_s if quick else sc.duration_s
        for u in utils:
            for r in range(repeats):
                k = r % len(policies)
                for pol in [*policies[k:], *policies[:k]]:
                    out.append(RunPlan(
                        sc, u, pol, r, duration, seed=seed + r, health=health,
                        policy_options=for_scenario(options_for(pol, policy_options or {}), sc.name),
                        extra_config=for_scenario(extra_config or {}, sc.name)))
    return out


def proxy_config(plan: RunPlan, backend_urls: Sequence[tuple[str, str]], port: int,
                 admin_port: int) -> dict[str, Any]:
    """The config file a user would write for this fleet and policy."""
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "workers": plan.workers,
        "backends": [{"id": bid, "url": url} for bid, url in backend_urls],
        "policy": {"kind": policy_kind(plan.policy), **plan.policy_options},
        # Only shutdown: the load has ended when the proxy is stopped.
        "timeouts": {"drain_s": 1.0},
    }
    if plan.health == "shadow":
        cfg["health"] = {name: {"shadow": True}
                         for name in ("consecutive", "success_rate", "latency")}
    elif plan.health != "default":
        raise BenchError(f"health mode must be 'default' or 'shadow', got {plan.health!r}")
    paths = [r.path for r in plan.scenario.routes]
    if len(paths) > 1:
        # One route class per path of the mix, so request-aware policies can tell them apart.
        cfg["routes"] = [{"name": route_class_name(p), "path_prefix": p}
                         for p in paths if p != "/"] + [{"name": "other", "path_prefix": "/"}]
    cfg.update(plan.extra_config)
    return cfg


def route_class_name(path: str) -> str:
    """The route class the bench config gives a path of the mix: `/search/x` -> `search`."""
    return path.strip("/").split("/")[0] or "root"


class ProxyProcess:
    """The proxy under test, in its own process, stopped by PID."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str) -> None:
        self.config = config
        self.port = int(config["listen"]["port"])
        self.admin_port = int(config["admin"]["port"])
        self.config_path = workdir / f"{name}.yaml"
        self.log_path = workdir / f"{name}.log"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = PROXY_READY_TIMEOUT_S) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", FORETELL_LOG_LEVEL="WARNING")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(self.config_path)],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        ready_url = f"http://127.0.0.1:{self.admin_port}/ready"
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"proxy exited with code {self.proc.returncode} at start; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"proxy not ready at {ready_url} within {timeout_s:.0f} s; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, n_bytes: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n_bytes:].decode(errors="replace")
        except OSError:
            return ""

    def cpu_s(self) -> float:
        """User+system CPU seconds of the proxy and its worker processes so far."""
        assert self.proc is not None
        return tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


def _merge(parts: Sequence[Records]) -> Records:
    if len(parts) == 1:
        return parts[0]
    ids: list[str] = []
    for r in parts:
        ids += [b for b in r.backend_ids if b not in ids]
    backends = []
    for r in parts:
        remap = np.array([ids.index(b) for b in r.backend_ids] + [-1], dtype=np.int16)
        backends.append(remap[r.backend])  # index -1 maps to the trailing -1
    order = np.argsort(np.concatenate([r.intended_s for r in parts]), kind="stable")

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(r, name) for r in parts])[order]

    return Records(intended_s=cat("intended_s"), latency_s=cat("latency_s"),
                   send_lag_s=cat("send_lag_s"), status=cat("status"), error=cat("error"),
                   backend=np.concatenate(backends)[order], route=cat("route"), backend_ids=ids,
                   routes=parts[0].routes, mode=parts[0].mode, meta=parts[0].meta)


def summarise(rec: Records, plan: RunPlan, proxy_cpu_s: float, n_sent: int) -> dict[str, Any]:
    """Metrics of one run over the measured window (warm-up excluded)."""
    sc = plan.scenario
    keep = rec.intended_s >= sc.warmup_s
    lat = rec.latency_s[keep]
    ok = rec.ok[keep]
    measured_s = plan.duration_s - sc.warmup_s
    n = int(keep.sum())
    if n == 0:
        raise BenchError(f"{plan.label}: no requests in the measured window")
    q = np.percentile(lat, [50, 99, 99.9]) * 1e3
    good = ok & (lat <= sc.deadline_s)
    backend_idx = rec.backend[keep]
    share = {}
    for i, bid in sorted(enumerate(rec.backend_ids), key=lambda x: x[1]):
        share[bid] = float(np.mean(backend_idx == i))
    # p99 per window over the whole run (warm-up included, so events in it show).
    t = rec.intended_s
    windows = []
    for w0 in np.arange(0.0, plan.duration_s, WINDOW_S):
        m = (t >= w0) & (t < w0 + WINDOW_S)
        windows.append(float(np.percentile(rec.latency_s[m], 99) * 1e3) if m.any() else None)
    return {
        "scenario": sc.name, "code": sc.code, "utilisation": plan.utilisation,
        "policy": plan.policy, "repeat": plan.repeat, "seed": plan.seed, "health": plan.health,
        "offered_rps": sc.rate_rps(plan.utilisation), "requests": n,
        "p50_ms": float(q[0]), "p99_ms": float(q[1]), "p999_ms": float(q[2]),
        "mean_ms": float(lat.mean() * 1e3),
        "error_rate": float(1.0 - ok.mean()),
        "deadline_rate": float(np.mean(rec.error[keep] == ERR_DEADLINE)),
        "goodput_rps": float(good.sum() / measured_s),
        "proxy_cpu_us_per_req": float(proxy_cpu_s / n_sent * 1e6) if n_sent else None,
        "client_lag_p99_ms": float(np.percentile(rec.send_lag_s[keep], 99) * 1e3),
        "backend_share": share,
        "p99_over_time_ms": windows,
        "window_s": WINDOW_S,
        "cdf_ms": [float(v) for v in np.percentile(lat, CDF_POINTS) * 1e3],
    }


def run_one(plan: RunPlan, workdir: Path) -> dict[str, Any]:
    """One policy against a fresh fleet; returns its summary."""
    sc = plan.scenario
    workdir.mkdir(parents=True, exist_ok=True)
    n_b = len(sc.backends)
    ports = free_ports(n_b + 2 * sc.proxies)
    fleet = Fleet(sc.fleet(ports[:n_b], plan.seed),
                  max_lifetime_s=plan.duration_s + PROXY_READY_TIMEOUT_S + 60.0)
    proxies: list[ProxyProcess] = []
    procs: list[subprocess.Popen[bytes]] = []
    tag = f"{sc.name}-u{plan.utilisation:g}-{plan.policy}-r{plan.repeat}"
    try:
        fleet.start(defer_origin=True)
        urls = [(b.id, b.url) for b in fleet.backends]
        for k in range(sc.proxies):
            cfg = proxy_config(plan, urls, ports[n_b + 2 * k], ports[n_b + 2 * k + 1])
            proxies.append(ProxyProcess(cfg, workdir, f"{tag}-proxy{k}"))
        for p in proxies:
            p.start()
        origin = time.monotonic() + LOAD_LEAD_S
        fleet.set_origin(origin)
        rate = sc.rate_rps(plan.utilisation) / sc.proxies
        squeeze = plan.duration_s / sc.duration_s
        profile = tuple((t * squeeze, m) for t, m in sc.rate_profile)
        specs, outs = [], []
        for k, p in enumerate(proxies):
            spec = LoadSpec(url=p.url, rate_rps=rate, duration_s=plan.duration_s,
                            routes=sc.routes, rate_profile=profile,
                            deadline_s=sc.deadline_s, seed=plan.seed * 31 + k,
                            start_at_s=origin, origin_s=origin)
            out = workdir / f"{tag}-load{k}.npz"
            specs.append(spec)
            outs.append(out)
            procs.append(loadgen.start(spec, out))
        time.sleep(max(0.0, origin - time.monotonic()))
        cpu0 = sum(p.cpu_s() for p in proxies)
        parts = [loadgen.wait(proc, spec, out) for proc, spec, out in zip(procs, specs, outs,
                                                                          strict=True)]
        cpu1 = sum(p.cpu_s() for p in proxies)
    finally:
        for lg in procs:
            if lg.poll() is None:  # only when something above failed
                lg.kill()
                lg.wait(timeout=5)
        for p in proxies:
            p.stop()
        fleet.stop()
    rec = _merge(parts)
    return summarise(rec, plan, cpu1 - cpu0, len(rec))


def run_all(plans: Sequence[RunPlan], out_dir: Path,
            progress: Callable[[str], None] = print,
            partial: Callable[[list[dict[str, Any]]], object] | None = None,
            ) -> list[dict[str, Any]]:
    """Run every plan in order; `partial(results)` after each run (to save progress)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "raw"
    raw.mkdir(exist_ok=True)
    results = []
    started = time.monotonic()
    for i, p in enumerate(plans, 1):
        t0 = time.monotonic()
        try:
            summary = run_one(p, raw)
        except (BenchError, loadgen.LoadgenError) as exc:
            progress(f"[{i}/{len(plans)}] {p.label}: FAILED: {exc}")
            results.append({"scenario": p.scenario.name, "utilisation": p.utilisation,
                            "policy": p.policy, "repeat": p.repeat, "failed": str(exc)})
            if partial is not None:
                partial(results)
            continue
        results.append(summary)
        if partial is not None:
            partial(results)
        progress(f"[{i}/{len(plans)}] {p.label}: p50 {summary['p50_ms']:.1f} ms  "
                 f"p99 {summary['p99_ms']:.1f} ms  err {summary['error_rate'] * 100:.2f}%  "
                 f"cpu {summary['proxy_cpu_us_per_req'] or float('nan'):.0f} us/req  "
                 f"({time.monotonic() - t0:.0f} s, total {time.monotonic() - started:.0f} s)")
    return results


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                            "platform": sys.platform}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["kernel"] = Path("/proc/sys/kernel/osrelease").read_text().strip()
    info["mem_gb"] = round(psutil.virtual_memory().total / 1024**3, 1)
    return info


def write_results(results: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> Path:
    path = out_dir / "results.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"meta": meta, "runs": results}, f, indent=1)
    os.replace(tmp, path)
    return path
