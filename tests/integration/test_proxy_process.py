"""The proxy as users run it: a separate process, signals, workers, big bodies."""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml
from aiohttp import web

from tests.support import (
    Backends,
    ProxyProcess,
    aiter_bytes,
    fetch_json,
    free_port,
    proxy_config,
    write_config,
)

BIG_BYTES = 100 * 1024 * 1024


@pytest.fixture
async def run_proxy(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, Any]], ProxyProcess]]:
    procs: list[ProxyProcess] = []

    def start(cfg: dict[str, Any]) -> ProxyProcess:
        port, admin_port = free_port(), free_port()
        cfg = {**cfg, "listen": {"host": "127.0.0.1", "port": port},
               "admin": {"host": "127.0.0.1", "port": admin_port}}
        proc = ProxyProcess(write_config(tmp_path / f"proxy-{len(procs)}.yaml", cfg), port, admin_port)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


async def _wait_ready(proc: ProxyProcess) -> None:
    await asyncio.get_running_loop().run_in_executor(None, proc.wait_ready)


class RssSampler:
    """Peak resident memory of a process, sampled while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            await asyncio.sleep(0.02)

    def stop(self) -> int:
        self._task.cancel()
        return self.peak - self.baseline


async def test_streams_100mb_both_ways_in_bounded_memory(backends: Backends, run_proxy) -> None:
    urls = {"a": await backends.start("a")}
    proc = run_proxy(proxy_config(urls))
    await _wait_ready(proc)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        sampler = RssSampler(proc.proc.pid)
        async with client.post(proc.url + "/upload", data=aiter_bytes(BIG_BYTES)) as resp:
            assert resp.status == 200
            assert (await resp.json())["received"] == BIG_BYTES
        upload_growth = sampler.stop()
        sampler = RssSampler(proc.proc.pid)
        received = 0
        async with client.get(proc.url + f"/bytes/{BIG_BYTES}?length=1") as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == BIG_BYTES
            async for chunk in resp.content.iter_chunked(1 << 20):
                received += len(chunk)
        download_growth = sampler.stop()
    assert received == BIG_BYTES
    # "Well below the body size": the proxy holds a few chunks, not the body.
    assert upload_growth < BIG_BYTES / 5, upload_growth
    assert download_growth < BIG_BYTES / 5, download_growth


async def test_sighup_applies_good_config_and_keeps_serving_on_bad(backends: Backends, run_proxy) -> None:
    urls = {n: await backends.start(n) for n in ("a", "b")}
    proc = run_proxy(proxy_config({"a": urls["a"]}))
    await _wait_ready(proc)
    async with aiohttp.ClientSession() as client:
        async def backends_hit(n: int) -> set[str]:
            seen = set()
            for _ in range(n):
                async with client.get(proc.url + "/echo") as resp:
                    assert resp.status == 200
                    seen.add(resp.headers["x-foretell-backend"])
            return seen

        assert await backends_hit(4) == {"a"}
        current = yaml.safe_load(proc.config_path.read_text())
        good = {**proxy_config(urls), "listen": current["listen"], "admin": current["admin"]}
        write_config(proc.config_path, good)
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while await backends_hit(4) != {"a", "b"}:
            assert time.monotonic() < deadline, proc.log()
            await asyncio.sleep(0.1)
        proc.config_path.write_text(proc.config_path.read_text() + "\nbogus_key: 1\n")
        proc.signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert await backends_hit(6) == {"a", "b"}
        assert proc.proc.poll() is None
        log = proc.log()
        assert "reload rejected" in log and "bogus_key" in log
        text = await (await client.get(proc.admin_url + "/metrics")).text()
        assert 'foretell_config_reloads_total{result="invalid"} 1.0' in text
        assert 'foretell_config_reloads_total{result="applied"} 1.0' in text


async def test_sigterm_drains_inflight_requests(backends: Backends, run_proxy) -> None:
    urls = {"a": await backends.start("a")}
    proc = run_proxy(proxy_config(urls, timeouts={"drain_s": 10}))
    await _wait_ready(proc)
    async with aiohttp.ClientSession() as client:
        async def slow() -> tuple[int, str]:
            async with client.get(proc.url + "/sleep/1500") as resp:
                return resp.status, await resp.text()

        pending = [asyncio.create_task(slow()) for _ in range(5)]
        await asyncio.sleep(0.4)
        proc.signal(signal.SIGTERM)
        results = await asyncio.gather(*pending)
    assert results == [(200, "a")] * 5
    code = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 10)
    assert code == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as client, client.get(proc.url + "/echo"):
            pass


async def _two_workers_up(proc: ProxyProcess) -> psutil.Process:
    """The proxy's main process, once it is ready and both its workers exist."""
    await _wait_ready(proc)
    parent = psutil.Process(proc.proc.pid)
    deadline = time.monotonic() + 20
    while len(parent.children()) < 2:
        assert time.monotonic() < deadline, proc.log()
        await asyncio.sleep(0.1)
    return parent


async def test_two_workers_share_the_port_and_metrics(backends: Backends, run_proxy) -> None:
    urls = {"a": await backends.start("a")}
    proc = run_proxy(proxy_config(urls, workers=2))
    parent = await _two_workers_up(proc)
    await asyncio.sleep(1.0)  # both workers bound
    total = 200
    # New connection per request so the kernel spreads them over both workers.
    for _ in range(total):
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as one, one.get(proc.url + "/echo") as resp:
            assert resp.status == 200
    pids = {c.pid for c in parent.children()}
    await asyncio.sleep(1.5)  # every worker publishes its counts once a second
    async with aiohttp.ClientSession() as client:
        text = await (await client.get(proc.admin_url + "/metrics")).text()
        snapshot = await fetch_json(client, proc.admin_url + "/backends")
    served = float(re.search(r'foretell_requests_total\{cluster="default",code_class="2xx"\} (\S+)',
                             text).group(1))  # type: ignore[union-attr]
    assert served == total
    assert len(pids) == 2
    # each worker counted some: worker 0 alone saw fewer than all of them
    worker0 = sum(b["requests"] for b in snapshot["clusters"]["default"]["backends"])
    assert 0 < worker0 < total


async def test_two_workers_recommend_replicas_from_their_summed_forecast(backends: Backends,
                                                                        run_proxy) -> None:
    """One keep-alive client loads one worker only: the replica gauge comes from the
    workers' summed forecast rate, not from a worker extrapolating its own share."""
    urls = {"a": await backends.start("a")}
    capacity = 5.0
    proc = run_proxy(proxy_config(urls, workers=2, forecast={
        "enabled": True, "interval_s": 0.5, "capacity_rps_per_replica": capacity}))
    await _two_workers_up(proc)
    async with aiohttp.ClientSession() as client:  # one connection: one worker
        stop = time.monotonic() + 1.5
        while time.monotonic() < stop:
            async with client.get(proc.url + "/echo") as resp:
                assert resp.status == 200
        # Scraped while the last closed interval still holds the load.
        text = await (await client.get(proc.admin_url + "/metrics")).text()
    rps = float(re.search(r"^foretell_forecast_requests_per_second (\S+)$", text,
                          re.M).group(1))  # type: ignore[union-attr]
    replicas = re.findall(r"^foretell_recommended_replicas (\S+)$", text, re.M)
    assert rps > 4 * capacity, text  # enough load that twice it would need more replicas
    assert [float(r) for r in replicas] == [math.ceil(rps / capacity - 1e-9)]


def _worker(parent: psutil.Process, worker_id: int) -> psutil.Process | None:
    """The supervisor's live child serving as worker `worker_id`, if there is one."""
    for child in parent.children():
        try:
            if child.environ().get("FORETELL_WORKER_ID") == str(worker_id):
                return child
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return None


async def _replacement(proc: ProxyProcess, parent: psutil.Process, worker_id: int,
                       old_pid: int) -> psutil.Process:
    deadline = time.monotonic() + 20
    while True:
        assert proc.proc.poll() is None, f"the supervisor exited:\n{proc.log()}"
        worker = _worker(parent, worker_id)
        if worker is not None and worker.pid != old_pid:
            return worker
        assert time.monotonic() < deadline, proc.log()
        await asyncio.sleep(0.1)


async def test_supervisor_restarts_a_killed_worker(backends: Backends, run_proxy) -> None:
    urls = {"a": await backends.start("a")}
    proc = run_proxy(proxy_config(urls, workers=2))
    parent = await _two_workers_up(proc)
    for worker_id in (1, 0):  # then the one that also serves the admin port
        old = _worker(parent, worker_id)
        assert old is not None
        old.kill()
        new = await _replacement(proc, parent, worker_id, old.pid)
        await _wait_ready(proc)
        # Its gauges went with it (a backend's health state, max across workers, showed the
        # dead worker's last value for good).
        metrics_dir = Path(new.environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert not list(metrics_dir.glob(f"gauge_*_{old.pid}.db"))
        for _ in range(20):  # new connections: the kernel spreads them over the workers listening
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as one, one.get(proc.url + "/echo") as resp:
                assert resp.status == 200
        async with aiohttp.ClientSession() as client, client.get(proc.admin_url + "/metrics") as resp:
            assert resp.status == 200, await resp.text()
            assert "foretell_requests_total" in await resp.text()
        assert f"worker {worker_id} (pid {old.pid}) was killed by SIGKILL" in proc.log()


async def test_a_restarted_worker_starts_like_its_siblings_whatever_the_file_says_now(
        backends: Backends, run_proxy) -> None:
    """The file since asks for one worker (a reload holds that) and is then broken: the
    replacement of a killed worker starts like its siblings, from the config their last
    reload applied, with the restart-only settings they started with (before, it bound the
    port without SO_REUSEPORT five times, and the supervisor took the proxy down)."""
    urls = {"a": await backends.start("a")}
    proc = run_proxy(proxy_config(urls, workers=2))
    parent = await _two_workers_up(proc)
    text = proc.config_path.read_text()
    proc.config_path.write_text(text.replace("workers: 2", "workers: 1"))
    proc.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(1.0)
    for then in ("as the other workers until a restart of the proxy: workers: 2 -> 1",
                 "starting from the config the last reload applied instead"):
        victim = _worker(parent, 1)
        assert victim is not None
        victim.kill()
        await _replacement(proc, parent, 1, victim.pid)
        await _logged(proc, then)
        await _logged(proc, "worker 1 listening", times=3 if "instead" in then else 2)
        proc.config_path.write_text(text + "\nbogus_key: 1\n")
    assert proc.proc.poll() is None, proc.log()


async def _logged(proc: ProxyProcess, text: str, times: int = 1, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.log().count(text) < times:
        assert time.monotonic() < deadline, f"not logged {times}x: {text!r}\n{proc.log()}"
        await asyncio.sleep(0.1)


async def test_supervisor_gives_up_on_a_worker_that_keeps_failing_to_start(backends: Backends,
                                                                          run_proxy, tmp_path) -> None:
    """What the config names is gone (its telemetry directory is a file now): no start can
    succeed, from the file or from what the workers started with."""
    urls = {"a": await backends.start("a")}
    telemetry = tmp_path / "telemetry"
    proc = run_proxy(proxy_config(urls, workers=2,
                                  telemetry={"enabled": True, "path": str(telemetry)}))
    parent = await _two_workers_up(proc)
    workers = parent.children()
    shutil.rmtree(telemetry)
    telemetry.write_text("")
    victim = _worker(parent, 1)
    assert victim is not None
    victim.kill()
    code = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 40)
    log = proc.log()
    assert code == 2, log  # the workers' own exit code for a bad config
    assert "telemetry.path" in log
    assert "worker 1 failed to start 5 times in a row" in log
    assert not [w for w in workers if w.is_running()], log  # worker 0 was stopped, not left behind


async def test_workers_exit_when_the_supervisor_is_killed(backends: Backends, run_proxy) -> None:
    urls = {"a": await backends.start("a")}
    proc = run_proxy(proxy_config(urls, workers=2))
    parent = await _two_workers_up(proc)
    workers = parent.children()
    # A SIGKILLed supervisor cannot remove its metrics directory: the test does.
    metrics_dir = workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"]
    proc.proc.kill()
    proc.proc.wait()
    deadline = time.monotonic() + 10
    try:
        while any(w.is_running() for w in workers):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            await asyncio.sleep(0.1)
    finally:
        for w in workers:
            if w.is_running():
                w.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for `sig` (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_during_startup_is_applied_once_started(backends: Backends, run_proxy,
                                                             workers: int) -> None:
    urls = {"a": await backends.start("a")}
    proc = run_proxy(proxy_config(urls, workers=workers))
    parent = psutil.Process(proc.proc.pid)
    # As early as the process can take it (the first thing it does), or once the supervisor
    # has started its workers; at the latest 0.3 s in, well before the proxy serves.
    deadline = time.monotonic() + (0.3 if workers == 1 else 10)
    while time.monotonic() < deadline:
        if (len(parent.children()) == workers) if workers > 1 else _catches(parent.pid, signal.SIGHUP):
            break
        await asyncio.sleep(0.005)
    assert not _listening(proc.port) and not _listening(proc.admin_port), "the proxy started too fast"
    pids = {c.pid for c in parent.children()}
    proc.signal(signal.SIGHUP)
    await _wait_ready(proc)
    async with aiohttp.ClientSession() as client, client.get(proc.url + "/echo") as resp:
        assert resp.status == 200
    # Each worker reloads once it serves: the file may have changed since it was read.
    await _logged(proc, "reload: applied", times=workers, timeout_s=10)
    assert {c.pid for c in parent.children()} == pids, proc.log()  # no worker died and came back
    assert "restarting" not in proc.log()


async def _sigterm_and_time_exit(proc: ProxyProcess) -> tuple[int, float]:
    """SIGTERM the proxy: its exit code and how long it took to exit."""
    sent = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 60)
    return code, time.monotonic() - sent


@pytest.mark.parametrize(("drain_s", "workers"), [(0, 1), (2, 1), (2, 2)])
async def test_sigterm_answers_requests_drain_s_cuts_and_exits_in_time(backends: Backends, run_proxy,
                                                                       drain_s: float, workers: int) -> None:
    urls = {"a": await backends.start("a")}
    proc = run_proxy(proxy_config(urls, workers=workers,
                                  timeouts={"drain_s": drain_s, "per_try_s": 60, "total_s": 60}))
    if workers > 1:
        await _two_workers_up(proc)
    await _wait_ready(proc)
    async with aiohttp.ClientSession() as client:
        async def slow() -> tuple[int, str | None]:
            async with client.get(proc.url + "/sleep/20000") as resp:
                await resp.read()
                return resp.status, resp.headers.get("x-foretell-error")

        pending = asyncio.create_task(slow())
        await asyncio.sleep(0.5)  # at the backend by now
        code, exit_s = await _sigterm_and_time_exit(proc)
        answer = await pending
    assert answer == (503, "shutting_down"), proc.log()
    assert exit_s < drain_s + 1.5, proc.log()
    assert code == 0


async def test_sigterm_closes_a_response_drain_s_cuts_after_its_headers(backends: Backends,
                                                                       run_proxy) -> None:
    async def dribble(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first bytes")
        await asyncio.sleep(20)
        return resp

    app = web.Application()
    app.router.add_get("/dribble", dribble)
    urls = {"slow": await backends.start("slow", app)}
    proc = run_proxy(proxy_config(urls, timeouts={"drain_s": 1, "per_try_s": 60, "total_s": 60}))
    await _wait_ready(proc)
    async with aiohttp.ClientSession() as client, client.get(proc.url + "/dribble") as resp:
        assert resp.status == 200
        assert await resp.content.readexactly(11) == b"first bytes"
        code, exit_s = await _sigterm_and_time_exit(proc)
        with pytest.raises(aiohttp.ClientPayloadError):  # cut, not passed off as complete
            await resp.read()
    assert exit_s < 1 + 1.5, proc.log()
    assert code == 0
