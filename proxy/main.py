"""`foretell serve`: one worker in-process, or a supervisor of N workers on one port.

With `workers: N > 1`, each worker is its own process binding the listen port
with SO_REUSEPORT (the kernel spreads connections); worker 0 also serves the
admin port, and prometheus_client's multiprocess mode makes its /metrics
cover every worker. The supervisor forwards SIGHUP and SIGTERM and restarts
a worker that dies: at once the first time, then after a wait that doubles
with each death, until a worker has served for STABLE_S. A restarted worker
starts like its siblings: the restart-only settings (port, workers, ...) of
the copy of the config file they all started from and, if the file has gone
bad since, the content of the copy their last reload kept (or of that first
copy). When START_ATTEMPTS workers in a row die before they serve (a busy
port, a file the config names gone), it gives up: it stops the other workers
and exits non-zero. Workers are told to stop (SIGTERM) when the supervisor
dies, however it dies.

SIGHUP ends a process by default. The first thing `serve` does is hold it: a
HUP that comes while the proxy starts is logged and applied as a reload once
the worker serves (the file may have changed since it was read). The
supervisor starts its workers with SIGHUP blocked, so one forwarded before a
worker's interpreter reaches `serve` waits for it there.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("foretell")

SUPERVISOR_POLL_S = 0.2
# A slot's first restart is immediate, the second waits this long, each further one twice as long.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
# A worker up this long has its slot's restart wait start over.
STABLE_S = 30.0
# Workers of one slot dying in a row before they serve: then the supervisor gives up.
START_ATTEMPTS = 5
# How long past drain_s the supervisor waits for a worker to exit before killing it.
STOP_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1
# The copy of the config file the workers started from, in the supervisor's temp dir.
STARTED_CONFIG_NAME = "started.yaml"
STARTED_CONFIG_ENV = "FORETELL_STARTED_CONFIG"
# Beside it, the config file the workers' last reload applied (each worker keeps it).
APPLIED_CONFIG_NAME = "applied.yaml"


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
    import asyncio  # here: it takes longer to import than all before serve() holds SIGHUP

    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class HeldHup:
    """SIGHUP remembered until the process can act on it, instead of ending it."""

    def __init__(self) -> None:
        self.received = False
        signal.signal(signal.SIGHUP, self._on_hup)
        # A worker starts with SIGHUP blocked (see Supervisor._start): one sent since arrives now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    def _on_hup(self, signum: int, _frame: object) -> None:
        self.received = True


def serve(config_path: str | Path) -> int:
    held_hup = HeldHup()  # first: until the proxy serves, SIGHUP's default action would end it
    # Imported after: reading and validating config (pydantic) takes a while to load.
    from proxy.config import ConfigError
    from proxy.loader import load

    worker_id = os.environ.get("FORETELL_WORKER_ID")
    if worker_id is not None and not follow_supervisor():
        return 1
    # One thread per model call: the proxy's cores serve requests, not BLAS pools.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise_fd_limit()
    started = os.environ.get(STARTED_CONFIG_ENV) if worker_id is not None else None
    try:
        loaded = load(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        if started is None:
            return 2
        # A worker restarted after the file went bad starts from what its siblings serve:
        # the file their last reload applied (kept by them), else the one they started from.
        applied = Path(started).with_name(APPLIED_CONFIG_NAME)
        fallback = applied if applied.exists() else Path(started)
        print(f"worker {worker_id}: starting from the config "
              f"{'the last reload applied' if fallback == applied else 'the proxy started with'} "
              "instead", file=sys.stderr)
        try:
            loaded = load(fallback)
        except ConfigError as again:
            print(again, file=sys.stderr)
            return 2
    single = worker_id is None and loaded.config.workers == 1
    setup_logging(f"w{worker_id}" if worker_id is not None else "w0" if single else "supervisor")
    if worker_id is not None or single:
        from proxy import worker

        if started is not None:
            loaded = worker.as_started(loaded, started)
        applied_copy = Path(started).with_name(APPLIED_CONFIG_NAME) if started else None
        return run_loop(worker.run(config_path, int(worker_id or 0), loaded,
                                   hup_received=lambda: held_hup.received,
                                   applied_copy=applied_copy))
    workers, drain_s = loaded.config.workers, loaded.config.timeouts.drain_s
    del loaded  # the supervisor serves nothing: its models are not kept
    return supervise(Path(config_path), workers, drain_s, hup_received=lambda: held_hup.received)


def follow_supervisor() -> bool:
    """Have this worker get SIGTERM (and drain) when its supervisor dies, even by SIGKILL
    (Linux). False when the supervisor is gone already: nobody would stop this worker."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.environ.get("FORETELL_SUPERVISOR_PID") in (None, str(os.getppid()))


def supervise(config_path: Path, workers: int, drain_s: float, *,
              hup_received: Callable[[], bool] = lambda: False) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="foretell-metrics-")
    supervisor = Supervisor(config_path, workers, drain_s, metrics_dir)
    try:
        # What the workers start from: a worker restarted later keeps its siblings'
        # restart-only settings (port, workers, ...) and, if the file has gone bad, its content.
        shutil.copyfile(config_path, Path(metrics_dir) / STARTED_CONFIG_NAME)
        return supervisor.run(hup_received)
    finally:
        supervisor.kill_all()  # whatever ended the supervisor, no worker outlives it
        shutil.rmtree(metrics_dir, ignore_errors=True)


def restart_delay_s(deaths: int) -> float:
    """Wait before restarting a worker that died `deaths` times since it last ran STABLE_S."""
    if deaths <= 1:
        return 0.0
    return float(min(RESTART_BACKOFF_S * 2 ** (deaths - 2), RESTART_BACKOFF_MAX_S))


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


@dataclass
class Slot:
    """One worker position (its id), its current process and the history its restarts follow."""

    worker_id: int
    proc: subprocess.Popen[bytes] | None = None
    # Read end of the pipe the worker writes to once it serves.
    ready_fd: int | None = None
    ready_at: float | None = None
    restart_at: float | None = None
    # Exits since the slot last had a worker up for STABLE_S.
    deaths: int = 0
    # Exits in a row of workers that never reported ready.
    start_failures: int = 0

    def on_exit(self, now: float) -> float | None:
        """Seconds until the restart, or None: the workers keep failing to start."""
        if self.ready_at is None:
            self.start_failures += 1
            if self.start_failures >= START_ATTEMPTS:
                return None
        else:
            self.start_failures = 0
            if now - self.ready_at >= STABLE_S:
                self.deaths = 0
        self.deaths += 1
        return restart_delay_s(self.deaths)


class Supervisor:
    """Starts the workers, forwards SIGHUP and SIGTERM, restarts a worker that dies."""

    def __init__(self, config_path: Path, workers: int, drain_s: float, metrics_dir: str) -> None:
        self.config_path = config_path
        self.drain_s = drain_s
        self.metrics_dir = metrics_dir
        self.slots = [Slot(i) for i in range(workers)]
        self._env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir,
                         FORETELL_SUPERVISOR_PID=str(os.getpid()),
                         **{STARTED_CONFIG_ENV: str(Path(metrics_dir) / STARTED_CONFIG_NAME)})
        self._stopping = False
        self._reload_requested = False

    def run(self, hup_received: Callable[[], bool]) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        if hup_received():
            log.info("supervisor: SIGHUP before the workers started: they read the config file as it is now")
        for slot in self.slots:
            self._start(slot)
        exit_code = 0
        while not self._stopping:
            time.sleep(SUPERVISOR_POLL_S)
            if self._reload_requested:
                self._reload_requested = False
                for slot in self.slots:
                    if slot.proc is not None:
                        slot.proc.send_signal(signal.SIGHUP)
            now = time.monotonic()
            for slot in self.slots:
                if slot.proc is None:
                    if slot.restart_at is not None and now >= slot.restart_at and not self._stopping:
                        self._start(slot)
                    continue
                self._check_ready(slot, now)
                code = slot.proc.poll()
                if code is None or self._stopping:
                    continue
                pid = slot.proc.pid
                self._reap(slot)
                delay_s = slot.on_exit(now)
                if delay_s is None:
                    log.error("supervisor: worker %d failed to start %d times in a row (the last, pid %d, "
                              "%s; its log above says why): giving up, stopping the other workers",
                              slot.worker_id, START_ATTEMPTS, pid, describe_exit(code))
                    # A worker that cannot start on a bad config exits 2: so does the proxy.
                    exit_code = 2 if code == 2 else 1
                    self._stopping = True
                    break
                unready = (f" before it was ready (failed start {slot.start_failures} of {START_ATTEMPTS})"
                           if slot.ready_at is None else "")
                log.error("supervisor: worker %d (pid %d) %s%s; restarting it in %.1f s", slot.worker_id,
                          pid, describe_exit(code), unready, delay_s)
                slot.ready_at = None
                slot.restart_at = now + delay_s
        self._stop_all()
        return exit_code

    def _on_stop(self, signum: int, _frame: object) -> None:
        self._stopping = True

    def _on_hup(self, signum: int, _frame: object) -> None:
        self._reload_requested = True

    def _start(self, slot: Slot) -> None:
        read_fd, write_fd = os.pipe()
        # The worker inherits the blocked signal: a HUP forwarded while its interpreter
        # starts is held for it, where the default action would end it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--config", str(self.config_path)],
                env=dict(self._env, FORETELL_WORKER_ID=str(slot.worker_id),
                         FORETELL_READY_FD=str(write_fd)),
                pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        slot.ready_fd, slot.ready_at, slot.restart_at = read_fd, None, None
        log.info("supervisor: started worker %d (pid %d)", slot.worker_id, slot.proc.pid)

    def _check_ready(self, slot: Slot, now: float) -> None:
        if slot.ready_fd is None:
            return
        try:
            said = os.read(slot.ready_fd, 1)
        except BlockingIOError:
            return
        if said:
            slot.ready_at = now
        os.close(slot.ready_fd)  # ready, or the worker closed it without a word (it is dying)
        slot.ready_fd = None

    def _reap(self, slot: Slot) -> None:
        """Forget a worker that exited; its gauges leave /metrics, its counts stay."""
        assert slot.proc is not None
        from prometheus_client import multiprocess

        # The supervisor's own environment has no PROMETHEUS_MULTIPROC_DIR: name the dir.
        # Every gauge is a live* one: this takes the dead worker's out (a backend's health
        # state, the model version), and a scrape racing it tolerates their files going.
        multiprocess.mark_process_dead(slot.proc.pid, self.metrics_dir)
        slot.proc = None
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None

    def _stop_all(self) -> None:
        """SIGTERM every worker: each drains for up to drain_s. One still there after is killed."""
        running = [slot.proc for slot in self.slots if slot.proc is not None and slot.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_s + STOP_GRACE_S
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("supervisor: worker pid %d did not drain in time; killing it", proc.pid)
                proc.kill()
                proc.wait()

    def kill_all(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait()
            if slot.ready_fd is not None:
                os.close(slot.ready_fd)
                slot.ready_fd = None
