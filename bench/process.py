"""Small helpers for the processes a bench starts: their CPU time, their readiness."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable

import aiohttp
import psutil


def tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process and all its children so far (NaN once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


async def wait_http_ok(url: str, timeout_s: float, *, poll_s: float = 0.2,
                       alive: Callable[[], bool] | None = None) -> None:
    """Return once `url` answers 200; RuntimeError after `timeout_s` or when `alive()` turns false."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"the process behind {url} exited before it was ready")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(poll_s)
    raise RuntimeError(f"{url} not ready within {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL: by PID, never by name."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
