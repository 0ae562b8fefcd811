"""`foretell bench instructions`: CPU instructions per request, counted, not timed.

Requests/s and CPU seconds swing by 20% or more on a shared 2-core machine.
Instructions executed by the proxy process do not: valgrind's callgrind
counts them exactly, whatever else the machine is doing. So this bench runs
each proxy under callgrind in front of the same two fast backends, warms it
up, zeroes the counters, sends a fixed number of requests (keep-alive, a few
at a time), and divides the instructions counted by the requests.

Compared side by side in one run: the 60-line aiohttp + uvloop proxy
(bench/minimal_proxy.py, the floor for Python) and Foretell with each policy
asked for. Under valgrind everything runs ~50x slower, so timers that fire
per second weigh more here than in real runs; with default health Foretell's
count includes its health checker's periodic work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.fleet import Fleet, ServiceTime, SimBackend, free_ports
from bench.process import stop_process, wait_http_ok
from bench.variants import policy_kind, resolve

WARMUP_REQUESTS = 300
CONCURRENCY = 4
READY_TIMEOUT_S = 300.0  # imports under valgrind are slow
TOTALS_RE = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


class InstructionsError(RuntimeError):
    pass


@dataclass
class Count:
    name: str
    instructions_per_request: float


def ensure_valgrind() -> None:
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        return
    script = Path(__file__).with_name("install_tools.sh")
    if subprocess.call(["sh", str(script), "valgrind"]) != 0 or not shutil.which("valgrind"):
        raise InstructionsError("valgrind is missing and could not be installed (bench/install_tools.sh)")


async def _drive(url: str, n: int) -> None:
    async with aiohttp.ClientSession() as session:
        async def worker(k: int) -> None:
            for _ in range(k):
                async with session.get(url) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise InstructionsError(f"{url} answered {resp.status}")

        await asyncio.gather(*(worker(n // CONCURRENCY) for _ in range(CONCURRENCY)))


def count(name: str, cmd: Sequence[str], port: int, requests: int, workdir: Path) -> Count:
    out_prefix = workdir / f"callgrind.{name.replace(' ', '_')}"
    log = workdir / f"{name.replace(' ', '_')}.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_prefix}.%p",
                                 *cmd], stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/x"
    try:
        try:
            asyncio.run(wait_http_ok(url, READY_TIMEOUT_S, poll_s=1.0, alive=lambda: proc.poll() is None))
        except RuntimeError as exc:
            raise InstructionsError(f"{exc} (under valgrind; see {log})") from None
        asyncio.run(_drive(url, WARMUP_REQUESTS))
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(_drive(url, requests))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        dumps = sorted(workdir.glob(f"{out_prefix.name}.{proc.pid}*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise InstructionsError(f"no callgrind dump for {name}")
        match = TOTALS_RE.search(dumps[-1].read_text(errors="replace"))
        if match is None:
            raise InstructionsError(f"no instruction total in {dumps[-1]}")
        return Count(name, int(match.group(1)) / requests)
    finally:
        stop_process(proc, timeout_s=60)  # slow to exit under valgrind


def run(policies: Sequence[str], requests: int,
        policy_options: dict[str, dict[str, object]] | None = None) -> list[Count]:
    """`policy_options`: each policy name's final options (bench.variants.resolve)."""
    ensure_valgrind()
    ports = free_ports(4)
    backends = [SimBackend(id=f"fast-{i}", port=ports[i], slots=1024,
                           service=ServiceTime("constant", mean_ms=0.0)) for i in range(2)]
    proxy_port, admin_port = ports[2], ports[3]
    work = Path(tempfile.mkdtemp(prefix="foretell-instructions-"))
    counts = []
    with Fleet(backends, max_lifetime_s=3600):
        print("instructions: minimal ...", file=sys.stderr, flush=True)
        counts.append(count("minimal (aiohttp+uvloop)",
                            [sys.executable, "-m", "bench.minimal_proxy", "--port", str(proxy_port),
                             *[b.url for b in backends]], proxy_port, requests, work))
        for policy in policies:
            cfg = work / f"foretell-{policy}.yaml"
            spec = {"kind": policy_kind(policy), **(policy_options or {}).get(policy, {})}
            cfg.write_text(
                f"listen: {{host: 127.0.0.1, port: {proxy_port}}}\n"
                f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n"
                f"policy: {json.dumps(spec)}\n"
                "backends:\n" + "".join(f"  - {{id: {b.id}, url: \"{b.url}\"}}\n" for b in backends))
            print(f"instructions: foretell {policy} ...", file=sys.stderr, flush=True)
            counts.append(count(f"foretell {policy}", [sys.executable, "-m", "proxy", "--config", str(cfg)],
                                proxy_port, requests, work))
    shutil.rmtree(work, ignore_errors=True)
    return counts


def table(counts: Sequence[Count], requests: int) -> str:
    base = counts[0].instructions_per_request
    lines = [f"Instructions per request (callgrind, {requests} GETs after {WARMUP_REQUESTS} warm-up, "
             f"{CONCURRENCY} keep-alive connections)", "",
             "| proxy | instructions / request | ÷ minimal |", "|---|---:|---:|"]
    for c in counts:
        lines.append(f"| {c.name} | {c.instructions_per_request:,.0f} | "
                     f"{c.instructions_per_request / base:.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="foretell bench instructions",
                                     description="instructions per request under callgrind, side by side")
    parser.add_argument("--policies", default="round_robin,p2c_peak_ewma")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--policy-options", default="{}", metavar="JSON",
                        help='options per policy kind or KIND@LABEL, e.g. \'{"onnx_latency": {"model_path": '
                             '"/abs/latency.onnx"}}\' (relative paths resolve in the proxy\'s cwd)')
    args = parser.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        options = json.loads(args.policy_options)
    except json.JSONDecodeError as exc:
        parser.error(f"--policy-options: {exc}")
    if not isinstance(options, dict):
        parser.error("--policy-options: a JSON object of objects, keyed by policy")
    try:
        resolved = resolve(policies, options, absolute=True)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        counts = run(policies, args.requests, resolved)
    except InstructionsError as exc:
        print(f"bench instructions: {exc}", file=sys.stderr)
        return 1
    print(table(counts, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
