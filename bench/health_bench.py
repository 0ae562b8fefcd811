"""`foretell bench health`: how fast sick backends are ejected, and at what cost.

Each run starts the bench fleet (child processes), the proxy as a separate
process (`python -m proxy --config FILE`, default policy), and the open-loop
load generator, and polls the admin `/backends` endpoint every 20 ms to see
when the proxy ejects whom. Cases:

- slow:     8 backends, 500 req/s; from t=4 s b0 is 10x slower but answers 200.
- fail:     same; from t=4 s b0 answers 503 at once (100% 5xx, fast).
- flap:     same; from t=4 s b0 alternates healthy / 503-fast every 1 s
            (first failing instant t=5 s; delays count from there).
- healthy:  speeds spread 1x..3x, no events, 70% load: every ejection is false.
- kill:     3 of 8 backends SIGKILLed and restarted at random times (seeded)
            during 60 s at 500 req/s: client-visible failed GETs.

Two health configurations run side by side: `foretell` (the shipped defaults:
no `health:` section at all) and `envoy` (Envoy's outlier-detection defaults:
5 consecutive 5xx counting local-origin errors, 10 s interval, 10% max
ejection, 30 s base ejection, no latency ejection, no active checks).
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen
from bench.fleet import Event, Fleet, ServiceTime, SimBackend, fleet_capacity_rps, free_ports
from bench.loadgen import LoadSpec, RouteMix
from bench.runner import LOAD_LEAD_S, PROXY_READY_TIMEOUT_S, ProxyProcess

N = 8
SLOTS = 2
SERVICE = ServiceTime("lognormal", mean_ms=20.0, lognormal_sigma=0.5)
RATE_RPS = 500.0
EVENT_AT_S = 4.0
POLL_S = 0.02
ROUTES = (RouteMix("/api", 1.0),)

# Envoy's outlier detection defaults, as closely as our knobs allow.
ENVOY_HEALTH: dict[str, Any] = {
    "active": {"enabled": False},
    # Envoy (split_external_local_origin_errors: false) counts connect errors as 5xx.
    "consecutive": {"consecutive_5xx": 5, "consecutive_transport": 5},
    # success_rate_minimum_hosts 5, success_rate_request_volume 100, 10 s interval.
    "success_rate": {"window_s": 10.0, "bucket_s": 1.0, "min_requests": 100, "min_hosts": 5},
    "latency": {"enabled": False},
    "ejection": {"evaluate_interval_s": 10.0, "max_ejection_percent": 10.0,
                 "base_ejection_s": 30.0, "max_ejection_s": 300.0,
                 "panic_threshold_percent": 50.0, "readmit_jitter_s": 0.0},
}
CONFIGS: dict[str, dict[str, Any] | None] = {"foretell": None, "envoy": ENVOY_HEALTH}


@dataclass(frozen=True)
class Case:
    name: str
    duration_s: float
    backends: tuple[SimBackend, ...]
    rate_rps: float
    target: str | None = None  # backend whose ejection is timed
    detect_from_s: float = 0.0  # when the target's misbehaviour starts
    kills: int = 0  # backends killed and restarted at random


def _fleet(speeds: Sequence[float] = (1.0,) * N, slots: int = SLOTS) -> list[SimBackend]:
    return [SimBackend(id=f"b{i}", port=0, slots=slots, service=SERVICE, speed=s, seed=i,
                       load_header=True) for i, s in enumerate(speeds)]


def _with_event(ev: Event) -> tuple[SimBackend, ...]:
    fleet = _fleet()
    fleet[0] = replace(fleet[0], events=(ev,))
    return tuple(fleet)


def cases(*, detect_s: float, healthy_s: float, kill_s: float) -> dict[str, Case]:
    end = 10_000.0
    speeds = [1.0 + 2.0 * i / (N - 1) for i in range(N)]
    skew = _fleet(speeds, slots=3)
    return {
        "slow": Case("slow", detect_s, _with_event(Event("slowdown", EVENT_AT_S, end, factor=10.0)),
                     RATE_RPS, "b0", EVENT_AT_S),
        "fail": Case("fail", detect_s, _with_event(Event("fail", EVENT_AT_S, end, status=503)),
                     RATE_RPS, "b0", EVENT_AT_S),
        "flap": Case("flap", detect_s, _with_event(Event("flap", EVENT_AT_S, end, period_s=1.0)),
                     RATE_RPS, "b0", EVENT_AT_S + 1.0),
        "healthy": Case("healthy", healthy_s, tuple(skew),
                        0.7 * fleet_capacity_rps(skew, {"/api": 1.0})),
        "kill": Case("kill", kill_s, tuple(_fleet()), RATE_RPS, kills=3),
    }


def proxy_config(health: dict[str, Any] | None, urls: Sequence[tuple[str, str]], port: int,
                 admin_port: int, record_path: Path | None = None,
                 model_path: Path | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "backends": [{"id": bid, "url": url} for bid, url in urls],
    }
    health = dict(health) if health is not None else {}
    if record_path is not None or model_path is not None:
        anomaly: dict[str, Any] = {}
        if record_path is not None:
            anomaly["record_path"] = str(record_path)
        if model_path is not None:
            anomaly["model_path"] = str(model_path)
        health["anomaly"] = anomaly
    if health:
        cfg["health"] = health
    return cfg


def kill_schedule(rng: random.Random, ids: Sequence[str], n: int,
                  duration_s: float) -> list[tuple[float, str, str]]:
    """(t_s, "kill"|"restart", backend): n backends, each down once or twice for 2-8 s."""
    out: list[tuple[float, str, str]] = []
    for b in rng.sample(list(ids), n):
        t = rng.uniform(3.0, duration_s / 3)
        while t < duration_s - 10.0:
            down_s = rng.uniform(2.0, 8.0)
            out += [(t, "kill", b), (t + down_s, "restart", b)]
            t += down_s + rng.uniform(5.0, duration_s / 2)
    return sorted(out)


class _Poller(threading.Thread):
    """Polls /backends; keeps each backend's health transitions (time from origin)."""

    def __init__(self, admin_url: str, origin_s: float, stop_at_s: float) -> None:
        super().__init__(daemon=True)
        self.url = admin_url + "/backends"
        self.origin_s = origin_s
        self.stop_at_s = stop_at_s
        self.transitions: list[tuple[float, str, str, str]] = []  # (t, backend, health, reason)
        self.last: dict[str, dict[str, Any]] = {}
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        seen: dict[str, str] = {}
        while not self._halt.is_set() and time.monotonic() < self.stop_at_s:
            try:
                with urllib.request.urlopen(self.url, timeout=1.0) as resp:
                    data = json.loads(resp.read())
            except (OSError, ValueError):
                self.errors += 1
                time.sleep(POLL_S)
                continue
            t = time.monotonic() - self.origin_s
            for cluster in data["clusters"].values():
                for b in cluster["backends"]:
                    self.last[b["id"]] = b
                    if seen.get(b["id"], "healthy") != b["health"]:
                        self.transitions.append((t, b["id"], b["health"], b["reason"]))
                    seen[b["id"]] = b["health"]
            time.sleep(POLL_S)

    def halt(self) -> None:
        self._halt.set()


def run_case(case: Case, config_name: str, seed: int, workdir: Path,
             record_path: Path | None = None, model_path: Path | None = None) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(N + 2)
    specs = [replace(b, port=p, seed=b.seed + 1000 * seed)
             for b, p in zip(case.backends, ports[:N], strict=True)]
    fleet = Fleet(specs, max_lifetime_s=case.duration_s + PROXY_READY_TIMEOUT_S + 60.0)
    tag = f"{case.name}-{config_name}-s{seed}"
    cfg = proxy_config(CONFIGS[config_name], [(b.id, b.url) for b in specs], ports[N],
                       ports[N + 1], record_path, model_path)
    proxy = ProxyProcess(cfg, workdir, tag)
    lg = None
    poller = None
    killer = None
    schedule = (kill_schedule(random.Random(seed), [b.id for b in specs], case.kills,
                              case.duration_s) if case.kills else [])
    try:
        fleet.start(defer_origin=True)
        proxy.start()
        origin = time.monotonic() + LOAD_LEAD_S
        fleet.set_origin(origin)
        spec = LoadSpec(url=proxy.url, rate_rps=case.rate_rps, duration_s=case.duration_s,
                        routes=ROUTES, deadline_s=2.0, seed=seed, start_at_s=origin,
                        origin_s=origin)
        out = workdir / f"{tag}.npz"
        lg = loadgen.start(spec, out)
        poller = _Poller(f"http://127.0.0.1:{ports[N + 1]}", origin, origin + case.duration_s + 1)
        poller.start()
        if schedule:
            killer = threading.Thread(target=_run_schedule, args=(fleet, schedule, origin),
                                      daemon=True)
            killer.start()
        rec = loadgen.wait(lg, spec, out)
        if killer is not None:
            killer.join(timeout=30)
        poller.halt()
        poller.join(timeout=5)
    finally:
        if lg is not None and lg.poll() is None:
            lg.kill()
            lg.wait(timeout=5)
        if poller is not None:
            poller.halt()
        proxy.stop()
        fleet.stop()
    return summarise(case, config_name, seed, rec, poller, schedule)


def _run_schedule(fleet: Fleet, schedule: list[tuple[float, str, str]], origin: float) -> None:
    for t, what, b in schedule:
        time.sleep(max(0.0, origin + t - time.monotonic()))
        if what == "kill":
            fleet.kill(b)
        else:
            fleet.restart(b)


def failures(rec: loadgen.Records) -> dict[str, int]:
    """Failed requests by cause: the proxy's reason header when it answered itself, else
    the client's error kind, else the status."""
    out: dict[str, int] = dict(rec.meta.get("proxy_errors", {}))
    failed = ~rec.ok
    for code, name in loadgen.ERROR_NAMES.items():
        n = int((failed & (rec.error == code)).sum()) if name else 0
        if n:
            out[name] = n
    # 5xx answers that did not come from the proxy (a backend's own, passed on).
    passed_on = int((failed & (rec.error == loadgen.ERR_NONE)).sum()) - sum(
        rec.meta.get("proxy_errors", {}).values())
    if passed_on > 0:
        out["backend_5xx"] = passed_on
    return out


def summarise(case: Case, config_name: str, seed: int, rec: loadgen.Records, poller: _Poller,
              schedule: list[tuple[float, str, str]]) -> dict[str, Any]:
    ok = rec.ok
    ejections = [(t, b, reason) for t, b, h, reason in poller.transitions if h == "ejected"]
    suspects = [(t, b, reason) for t, b, h, reason in poller.transitions if h == "suspect"]
    out: dict[str, Any] = {
        "case": case.name, "config": config_name, "seed": seed, "rate_rps": round(case.rate_rps),
        "duration_s": case.duration_s, "requests": len(rec),
        "failed_requests": int((~ok).sum()),
        "failures": failures(rec),
        "proxy_error_examples": rec.meta.get("proxy_error_examples", []),
        "ejections": len(ejections),
        "suspect_transitions": len(suspects),
        "poll_errors": poller.errors,
        "transitions": [(round(t, 3), b, h, r[:160]) for t, b, h, r in poller.transitions],
    }
    if case.target is not None:
        hit = [t for t, b, _ in ejections if b == case.target and t >= case.detect_from_s - POLL_S]
        out["detection_delay_s"] = round(hit[0] - case.detect_from_s, 3) if hit else None
        out["detected_by"] = next((r.split(":")[0].removeprefix("ejected by ")
                                   for t, b, r in ejections if b == case.target), None)
        out["other_ejections"] = sum(1 for _, b, _ in ejections if b != case.target)
        # Failed requests after the event, for context (these are retried where safe).
        after = rec.intended_s >= case.detect_from_s
        out["failed_after_event"] = int((~ok & after).sum())
    if case.name == "healthy":
        out["false_ejections"] = len(ejections)
        out["false_ejections_per_backend_hour"] = round(
            len(ejections) / (N * case.duration_s / 3600.0), 3)
    if schedule:
        out["kill_schedule"] = [(round(t, 2), w, b) for t, w, b in schedule]
    return out


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(r["case"], r["config"]) for r in results},
                  key=lambda k: (list(CASE_ORDER).index(k[0]), k[1] != "foretell"))
    for case, config in keys:
        rs = [r for r in results if r["case"] == case and r["config"] == config]
        row: dict[str, Any] = {"case": case, "config": config, "runs": len(rs),
                               "rate_rps": rs[0]["rate_rps"], "duration_s": rs[0]["duration_s"]}
        if "detection_delay_s" in rs[0]:
            delays = [r["detection_delay_s"] for r in rs]
            found = [d for d in delays if d is not None]
            row["detected"] = f"{len(found)}/{len(rs)}"
            row["delay_median_s"] = round(statistics.median(found), 3) if found else None
            row["delay_max_s"] = round(max(found), 3) if found else None
            row["other_ejections"] = sum(r["other_ejections"] for r in rs)
        if case == "healthy":
            row["false_ejections"] = sum(r["false_ejections"] for r in rs)
        row["failed_requests"] = sum(r["failed_requests"] for r in rs)
        causes: dict[str, int] = {}
        for r in rs:
            for cause, n in r.get("failures", {}).items():
                causes[cause] = causes.get(cause, 0) + n
        row["failures"] = causes
        row["requests"] = sum(r["requests"] for r in rs)
        rows.append(row)
    return rows


CASE_ORDER = ("slow", "fail", "flap", "healthy", "kill")


def _causes(failures: dict[str, int]) -> str:
    return f" ({', '.join(f'{c} {n}' for c, n in sorted(failures.items()))})" if failures else ""


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| case | config | runs | rate req/s | s per run | detected | delay median s "
            "| delay max s | other ejections | false ejections | failed / requests |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        def g(k: str, r: dict[str, Any] = r) -> str:
            v = r.get(k)
            return "—" if v is None else str(v)
        lines.append(f"| {r['case']} | {r['config']} | {r['runs']} | {r['rate_rps']} | "
                     f"{r['duration_s']:g} | {g('detected')} | {g('delay_median_s')} | "
                     f"{g('delay_max_s')} | {g('other_ejections')} | {g('false_ejections')} | "
                     f"{r['failed_requests']} / {r['requests']}{_causes(r['failures'])} |")
    return "\n".join(lines)


def run_bench(*, which: Sequence[str], configs: Sequence[str], seeds: Sequence[int],
              detect_s: float, healthy_s: float, kill_s: float, healthy_seeds: Sequence[int],
              out_dir: Path, record_anomaly: Path | None = None,
              anomaly_model: Path | None = None,
              progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    table = cases(detect_s=detect_s, healthy_s=healthy_s, kill_s=kill_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for name in which:
        case = table[name]
        case_seeds = healthy_seeds if name in ("healthy", "kill") else seeds
        for seed in case_seeds:
            for config in configs:
                rec_path = record_anomaly if (record_anomaly is not None and name == "healthy"
                                              and config == "foretell") else None
                model = anomaly_model if config == "foretell" else None
                started = time.monotonic()
                try:
                    r = run_case(case, config, seed, out_dir / "raw", rec_path, model)
                except Exception as exc:  # one broken run must not lose the others
                    r = {"case": name, "config": config, "seed": seed, "error": str(exc)[:2000]}
                    progress(f"  {name} {config} seed={seed}: FAILED {exc}")
                else:
                    causes = f" {r['failures']}" if r["failures"] else ""
                    progress(f"  {name} {config} seed={seed}: delay={r.get('detection_delay_s')} "
                             f"ejections={r['ejections']} failed={r['failed_requests']}/"
                             f"{r['requests']}{causes} ({time.monotonic() - started:.0f} s)")
                results.append(r)
                (out_dir / "health_results.json").write_text(json.dumps(results, indent=1))
    return results


def summary_numbers(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, for the foretell configuration."""
    ok = [r for r in results if "error" not in r and r["config"] == "foretell"]

    def worst(case: str) -> float | None:
        d = [r["detection_delay_s"] for r in ok if r["case"] == case]
        return None if not d or any(x is None for x in d) else float(np.max(d))

    def total(case: str, key: str) -> int | None:
        # None, not 0, when the case was not run: an absent run proves nothing.
        rs = [r for r in ok if r["case"] == case]
        return sum(int(r[key]) for r in rs) if rs else None

    return {
        "slow_max_delay_s (target <= 2)": worst("slow"),
        "fail_max_delay_s (target <= 1)": worst("fail"),
        "flap_max_delay_s": worst("flap"),
        "healthy_false_ejections (target 0)": total("healthy", "false_ejections"),
        "kill_failed_requests (target 0)": total("kill", "failed_requests"),
    }


def add_parser(sub: Any) -> None:
    """Register `foretell bench health` on bench/cli.py's sub-parsers."""
    p = sub.add_parser("health", help="health detection delay, false ejections, kill/restart "
                                      "errors: Foretell defaults vs Envoy-like defaults")
    p.add_argument("--cases", default=",".join(CASE_ORDER),
                   help=f"comma list of {', '.join(CASE_ORDER)} (default: all)")
    p.add_argument("--configs", default="foretell,envoy", help="comma list of foretell, envoy")
    p.add_argument("--seeds", type=int, default=5, help="seeded runs per detection case")
    p.add_argument("--quick", action="store_true",
                   help="healthy and kill cases: 60 s with one seed (instead of 600 s / 60 s "
                        "with --seeds seeds)")
    p.add_argument("--detect-s", type=float, default=10.0, help="length of a detection run")
    p.add_argument("--out", default="bench-out/health", help="output directory")
    p.add_argument("--record-anomaly", type=Path, default=None,
                   help="record anomaly feature rows of the healthy case (foretell config) here, "
                        "for `foretell train anomaly`")
    p.add_argument("--anomaly-model", type=Path, default=None,
                   help="run the foretell config with this anomaly model")
    p.set_defaults(func=_cli)


def _cli(args: Any) -> int:
    import sys

    which = [c.strip() for c in args.cases.split(",") if c.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in which if c not in CASE_ORDER] + [c for c in configs if c not in CONFIGS]
    if bad:
        print(f"bench health: unknown case/config {bad}", file=sys.stderr)
        return 2
    seeds = list(range(1, args.seeds + 1))
    healthy_s, healthy_seeds = (60.0, [1]) if args.quick else (600.0, seeds)
    out = Path(args.out)
    results = run_bench(which=which, configs=configs, seeds=seeds, detect_s=args.detect_s,
                        healthy_s=healthy_s, kill_s=60.0, healthy_seeds=healthy_seeds,
                        out_dir=out, record_anomaly=args.record_anomaly,
                        anomaly_model=args.anomaly_model,
                        progress=lambda s: print(s, file=sys.stderr, flush=True))
    good = [r for r in results if "error" not in r]
    table = markdown(aggregate(good))
    numbers = summary_numbers(results)
    command = "foretell bench " + " ".join(getattr(args, "argv", []))
    text = (f"# Health bench\n\n`{command}`\n\n{table}\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in numbers.items()) + "\n")
    (out / "health_results.md").write_text(text)
    print(text)
    return 1 if len(good) < len(results) else 0
