"""`foretell serve`: one worker in-process, or a supervisor of N workers on one port.

With `workers: N > 1`, each worker is its own process binding the listen port
with SO_REUSEPORT (the kernel spreads connections); worker 0 also serves the
admin port, and prometheus_client's multiprocess mode makes its /metrics
cover every worker. The supervisor forwards SIGHUP and SIGTERM and restarts
a worker that dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from proxy.config import ConfigError
from proxy.loader import load

log = logging.getLogger("foretell")

RESTART_BACKOFF_S = 1.0
SUPERVISOR_POLL_S = 0.2


def setup_logging(role: str) -> None:
    logging.basicConfig(
        level=os.environ.get("FORETELL_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s",
    )


def raise_fd_limit() -> None:
    """Every client and upstream connection is a file descriptor: allow as many as the system does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed, else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def serve(config_path: str | Path) -> int:
    # One thread per model call: the proxy's cores serve requests, not BLAS pools.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise_fd_limit()
    try:
        loaded = load(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    worker_id = os.environ.get("FORETELL_WORKER_ID")
    single = worker_id is None and loaded.config.workers == 1
    setup_logging(f"w{worker_id}" if worker_id is not None else "w0" if single else "supervisor")
    if worker_id is not None or single:
        from proxy import worker

        return run_loop(worker.run(config_path, int(worker_id or 0)))
    return supervise(Path(config_path), loaded.config.workers, loaded.config.timeouts.drain_s)


def supervise(config_path: Path, workers: int, drain_s: float) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="foretell-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False
    reload_requested = False

    def start(i: int) -> None:
        procs[i] = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config_path)],
            env=dict(env, FORETELL_WORKER_ID=str(i)))
        log.info("supervisor: started worker %d (pid %d)", i, procs[i].pid)

    def on_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    def on_hup(signum: int, _frame: object) -> None:
        nonlocal reload_requested
        reload_requested = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    from prometheus_client import multiprocess

    try:
        for i in range(workers):
            start(i)
        while not stopping:
            time.sleep(SUPERVISOR_POLL_S)
            if reload_requested:
                reload_requested = False
                for p in procs.values():
                    p.send_signal(signal.SIGHUP)
            for i, p in list(procs.items()):
                code = p.poll()
                if code is not None and not stopping:
                    multiprocess.mark_process_dead(p.pid)
                    log.error("supervisor: worker %d (pid %d) exited with %d; restarting", i, p.pid, code)
                    time.sleep(RESTART_BACKOFF_S)
                    start(i)
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + drain_s + 5.0
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("supervisor: worker pid %d did not drain in time; killing it", p.pid)
                p.kill()
                p.wait()
        return 0
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
