"""Microbenchmark: the cost of one `policy.pick()` in microseconds, per policy.

    python -m bench.pick_cost [--backends 16] [--picks 20000] [--policies a,b]

Builds a real `proxy.state.Cluster` of N backends with varied state (recent
latencies, a few errors, requests in flight, some reported load), then times
each pick separately with `perf_counter_ns`, subtracting the timer's own
median overhead. Reports p50, p99 and mean per policy. Policies are created
from the registry with default options; a policy that cannot be built that
way (for example a learned policy without a model file) is listed with the
reason. Run it on a quiet machine and compare rows within one run.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack

from policies import registry
from policies.base import Policy, PolicyContext, RequestInfo
from proxy.state import Backend, Cluster, Outcome


def build_cluster(n_backends: int, stack: ExitStack, seed: int = 1) -> Cluster:
    rng = random.Random(seed)
    backends = [Backend(f"b{i}", f"http://127.0.0.1:{9000 + i}", weight=1 + i % 3)
                for i in range(n_backends)]
    cluster = Cluster("bench", backends)
    for state in cluster.states.values():
        mean_s = rng.uniform(0.002, 0.020)
        for _ in range(64):
            status = 500 if rng.random() < 0.02 else 200
            with cluster.track(state) as t:
                t.finish(Outcome(status, rng.expovariate(1.0 / mean_s)))
        for _ in range(rng.randrange(4)):
            stack.enter_context(cluster.track(state))
        if rng.random() < 0.5:
            cluster.set_reported_load(state.id, rng.random())
    return cluster


def time_picks(policy: Policy, ready: Sequence[object], requests: Sequence[RequestInfo],
               n_picks: int) -> list[float]:
    """Per-pick times in microseconds, timer overhead removed."""
    clock = time.perf_counter_ns
    pick = policy.pick
    n_req = len(requests)
    for i in range(min(2000, n_picks)):  # warm caches (rings, index lists)
        pick(ready, requests[i % n_req])  # type: ignore[arg-type]
    overhead = []
    for _ in range(2000):
        t0 = clock()
        overhead.append(clock() - t0)
    base_ns = statistics.median(overhead)
    samples = []
    for i in range(n_picks):
        req = requests[i % n_req]
        t0 = clock()
        pick(ready, req)  # type: ignore[arg-type]
        samples.append(max(0.0, clock() - t0 - base_ns) / 1e3)
    return samples


def percentile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q / 100.0 * len(sorted_values)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pick_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--backends", type=int, default=16)
    parser.add_argument("--picks", type=int, default=20_000)
    parser.add_argument("--policies", default="", help="comma-separated kinds (default: all built-in)")
    args = parser.parse_args(argv)
    kinds = [k for k in args.policies.split(",") if k] or registry.builtin_kinds()
    rng = random.Random(7)
    requests = [RequestInfo(method="GET", path="/api", route_class="default",
                            client_ip=f"10.0.{i // 256}.{i % 256}") for i in range(1024)]
    print(f"# policy.pick() cost, {args.backends} backends, {args.picks} picks each, "
          f"Python {sys.version.split()[0]}")
    print(f"{'policy':<18} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    with ExitStack() as stack:
        cluster = build_cluster(args.backends, stack)
        ready = cluster.ready()
        for kind in kinds:
            try:
                policy = registry.create(kind, {}, PolicyContext(rng=random.Random(rng.random())))
            except Exception as exc:  # a policy needing options or files: say so, go on
                print(f"{kind:<18} {'not built with defaults: ' + str(exc).splitlines()[0]}")
                continue
            gc.collect()
            samples = sorted(time_picks(policy, ready, requests, args.picks))
            print(f"{kind:<18} {percentile(samples, 50):>8.2f} {percentile(samples, 99):>8.2f} "
                  f"{statistics.fmean(samples):>8.2f}")
            close = getattr(policy, "close", None)
            if close is not None:
                close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
