"""Microbenchmark: onnx_latency pick cost with N backends, beside p2c_peak_ewma.

    python -m bench.onnx_pick_cost [--backends 16] [--picks 20000] [--model FILE] [--max-scored K]

Without `--model`, small models of each kind the trainer can pick (ridge,
MLP 2x32, histogram gradient boosting) are fitted on random rows and
exported through the trainer's own export path (train.latency.to_onnx), so
the numbers are for the same graphs the proxy would load. Each pick is timed
separately (perf_counter_ns, timer overhead removed) against a real
`proxy.state.Cluster` with varied state (bench.pick_cost.build_cluster);
requests alternate between route classes, and `observe()` is timed too,
since it also runs per request.

A pick reuses cached predictions until an outcome arrived and `rescore_s`
passed, so picks alone (no outcomes) would almost never run the model. The
"request" columns time pick + observe together, one outcome per pick, with
the real clock: the default `rescore_s` (the saturated regime, where most
picks reuse the cache) and `rescore_s: 0` (every pick after an outcome runs
the model: what each request costs at low request rates).
Target: onnx_latency p50 <= 20 us with 16 backends.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench.pick_cost import build_cluster, time_picks
from policies import registry
from policies.base import PolicyContext, RequestInfo
from policies.features import N_FEATURES, schema_metadata
from proxy.state import Outcome

ROUTES = ("search", "render", "api")
TARGET_P50_US = 20.0  # issue 5: pick cost p50 with TARGET_BACKENDS backends
TARGET_BACKENDS = 16


def synthetic_model(kind: str, path: Path) -> Path:
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    from train.latency import make_candidate, to_onnx

    rng = np.random.default_rng(0)
    x = rng.random((3000, N_FEATURES), dtype=np.float32) * 10
    y = x @ rng.random(N_FEATURES) + rng.normal(0, 1, 3000)
    # One thread: OpenMP's spinning workers made this fit ~10x slower while another
    # process held the second core. Only the graph's shape and size matter for timing,
    # not how well it fits.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = make_candidate(kind, seed=0).fit(x, y)
    path.write_bytes(to_onnx(model, {**schema_metadata(ROUTES), "foretell.target": "latency_ms",
                                     "foretell.model_kind": kind,
                                     "foretell.model_version": f"synthetic-{kind}",
                                     "foretell.training_window": "{}",
                                     "foretell.validation": "{}"}))
    return path


def _stats(times_us: list[float]) -> tuple[float, float, float]:
    s = sorted(times_us)
    return (s[len(s) // 2], s[min(len(s) - 1, int(0.99 * len(s)))], statistics.fmean(s))


def observe_cost(policy: object, ready: tuple[object, ...], n: int) -> list[float]:
    observe = policy.observe  # type: ignore[attr-defined]
    req = RequestInfo(route_class="search")
    out = Outcome(200, 0.005, None, 0, "search")
    times = []
    for i in range(n):
        b = ready[i % len(ready)]
        t0 = time.perf_counter_ns()
        observe(b, req, out)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def request_cost(policy: object, ready: tuple[object, ...], requests: list[RequestInfo],
                 n: int) -> list[float]:
    """Per-request policy time (pick, then observe of the chosen backend), in µs."""
    pick, observe = policy.pick, policy.observe  # type: ignore[attr-defined]
    out = Outcome(200, 0.005, None, 0, "search")
    times = []
    for i in range(n):
        req = requests[i % len(requests)]
        t0 = time.perf_counter_ns()
        observe(pick(ready, req), req, out)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.onnx_pick_cost")
    ap.add_argument("--backends", type=int, default=16)
    ap.add_argument("--picks", type=int, default=20000)
    ap.add_argument("--model", type=Path, default=None, help="a trained model (default: "
                    "synthetic ridge, mlp and hgb models)")
    ap.add_argument("--max-scored", type=int, default=0,
                    help="onnx_latency's max_scored: argmin over a random subset (0 = all)")
    args = ap.parse_args(argv)
    rows: list[tuple[str, float, float, float, float | None]] = []
    per_request: list[tuple[str, float, float]] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        cluster = build_cluster(args.backends, stack)
        ready = cluster.ready()
        requests = [RequestInfo(route_class=ROUTES[i % 3], body_size=(i * 37) % 500)
                    for i in range(64)]
        models = ([("model", args.model)] if args.model else
                  [(k, synthetic_model(k, Path(tmp) / f"{k}.onnx")) for k in ("ridge", "mlp", "hgb")])
        ctx = PolicyContext(rng=random.Random(1), route_classes=ROUTES)
        base = registry.create("p2c_peak_ewma", {}, ctx)
        rows.append(("p2c_peak_ewma", *_stats(time_picks(base, ready, requests, args.picks)),
                     None))
        for label, path in models:
            policy = registry.create("onnx_latency", {"model_path": str(path), "budget_us": 1e9,
                                                      "max_scored": args.max_scored}, ctx)
            if getattr(policy, "model", None) is None:
                print(f"{label}: model did not load: {path}", file=sys.stderr)
                return 1
            t = time_picks(policy, ready, requests, args.picks)
            obs = _stats(observe_cost(policy, ready, 5000))
            rows.append((f"onnx_latency ({label})", *_stats(t), obs[0]))
            for rescore_s in (None, 0.0):
                opts = {"model_path": str(path), "budget_us": 1e9, "min_history": 0,
                        "max_scored": args.max_scored}
                if rescore_s is not None:
                    opts["rescore_s"] = rescore_s
                pol = registry.create("onnx_latency", opts, ctx)
                req_t = _stats(request_cost(pol, ready, requests, args.picks))
                name = "default" if rescore_s is None else f"rescore_s={rescore_s:g}"
                per_request.append((f"onnx_latency ({label}, {name})", req_t[0], req_t[2]))
    print(f"pick cost, {args.backends} backends, {args.picks} picks (µs)")
    print("| policy | p50 | p99 | mean | observe() p50 |\n|---|---|---|---|---|")
    for name, p50, p99, mean, obs_p50 in rows:
        cell = f"{obs_p50:.1f}" if obs_p50 is not None else "-"
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {mean:.1f} | {cell} |")
    print("\nper request: pick + observe, one outcome per pick (µs)")
    judged = args.backends == TARGET_BACKENDS
    print(f"| policy | p50 | mean | p50 <= {TARGET_P50_US:g} µs |\n|---|---|---|---|")
    for name, p50, mean in per_request:
        verdict = ("yes" if p50 <= TARGET_P50_US else "no") if judged else \
            f"- (judged at {TARGET_BACKENDS} backends)"
        print(f"| {name} | {p50:.1f} | {mean:.1f} | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
