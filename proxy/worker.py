"""One proxy process: listener, admin (worker 0), reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import shutil
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy import admin, metrics, runtime
from proxy.access_log import AccessLog
from proxy.config import Config, ConfigError, read_config
from proxy.loader import Loaded, load
from proxy.protocol import ProxyHttpServer
from proxy.server import Proxy

log = logging.getLogger("foretell.worker")

GAUGE_REFRESH_S = 1.0
DRAIN_POLL_S = 0.05
# After drain_s: how long requests cut then have to send their 503, and how long aiohttp
# then waits for a connection to finish (twice: before and after cancelling its handler).
CUT_GRACE_S = 0.5
CLOSE_GRACE_S = 0.2
RETIRE_POLL_S = 0.5
# A replaced runtime's upstream pools live at most this long for requests still on them.
UPSTREAM_RETIRE_CAP_S = 600.0


def listen_ssl(config: Config) -> ssl.SSLContext | None:
    tls = config.listen.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


# What a running worker cannot change: its sockets, its HTTP parser's limits and
# timers, and the writers it started with. (section, fields; None: all of them)
_RESTART_ONLY: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("listen", ("host", "port", "backlog")),
    ("admin", None),
    ("limits", ("max_header_bytes", "max_header_count")),
    ("timeouts", ("client_header_s", "client_idle_s", "drain_s")),
    ("access_log", None),
    ("telemetry", None),
    ("forecast", None),
)


def as_started(loaded: Loaded, started_path: str) -> Loaded:
    """`loaded` with the restart-only settings of the config the proxy's workers started
    from (a worker the supervisor restarts must bind and behave like its siblings)."""
    try:
        started = read_config(started_path)
    except ConfigError as exc:  # the copy gone (a /tmp cleaner) or changed: the file as it is
        log.warning("cannot read the config the workers started from, starting from the file "
                    "as it is: %s", exc)
        return loaded
    effective, held = held_for_restart(loaded.config, started)
    if not held:
        return loaded
    log.warning("as the other workers until a restart of the proxy: %s", "; ".join(held))
    return dataclasses.replace(loaded, config=effective)


def held_for_restart(new: Config, running: Config) -> tuple[Config, list[str]]:
    """`new` with what a running worker cannot change put back as it runs, and those
    changes ("path: running -> new"), so the config in effect is the one /config shows."""
    held: list[str] = []
    updates: dict[str, Any] = {}
    if new.workers != running.workers:
        held.append(f"workers: {running.workers} -> {new.workers}")
        updates["workers"] = running.workers
    for section, names in _RESTART_ONLY:
        new_part, old_part = getattr(new, section), getattr(running, section)
        kept = {n: getattr(old_part, n) for n in names or type(old_part).model_fields
                if getattr(new_part, n) != getattr(old_part, n)}
        if section == "listen" and (new_part.tls is None) != (old_part.tls is None):
            kept["tls"] = old_part.tls  # switching TLS on or off; new files for it reload
        held += [f"{section}.{n}: {v!r} -> {getattr(new_part, n)!r}" for n, v in kept.items()]
        if kept:
            updates[section] = new_part.model_copy(update=kept)
    return (new.model_copy(update=updates) if updates else new), held


class Worker:
    def __init__(self, config_path: str | Path, worker_id: int = 0,
                 applied_copy: Path | None = None) -> None:
        self.config_path = Path(config_path)
        # Under a supervisor: a worker it restarts while the file is bad starts from this.
        self._applied_copy = applied_copy
        self.worker_id = worker_id
        self.proxy: Proxy | None = None
        self._stop = asyncio.Event()
        self._runner: web.BaseRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._ssl: ssl.SSLContext | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._extras: list[Any] = []
        # Upstream pools of replaced runtimes, not yet closed (closed at stop at the latest).
        self._pending_upstreams: list[Any] = []
        self.listen_port: int | None = None
        self.admin_port: int | None = None
        self._serving = False
        self._hup_held = False
        self._drain_s = 0.0
        # One reload at a time, each reading the file when its turn comes: two SIGHUPs
        # close together applied their loads (in threads) in the order they finished.
        self._reload_lock = asyncio.Lock()
        # The route classes telemetry records with (fixed when it starts), if it runs.
        self._telemetry_routes: list[str] | None = None

    # -- lifecycle --------------------------------------------------------------
    async def start(self, loaded: Loaded | None = None) -> None:
        loaded = loaded or load(self.config_path)
        config = loaded.config
        rt, _ = await runtime.build(loaded, None)
        telemetry, forecaster = await self._start_extras(config)
        access_log = AccessLog(config.access_log) if config.access_log.enabled else None
        self.proxy = Proxy(rt, telemetry=telemetry, forecaster=forecaster, access_log=access_log)
        limits = config.limits
        server = ProxyHttpServer(
            self.proxy.handle,
            header_timeout_s=config.timeouts.client_header_s,
            keepalive_timeout=config.timeouts.client_idle_s,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_header_count,
            # A client that goes away cancels its upstream request too.
            handler_cancellation=True,
            json_log=access_log,
        )
        self._drain_s = config.timeouts.drain_s
        # stop() drains; aiohttp's own wait (twice this) only bounds the last writes.
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=CLOSE_GRACE_S)
        await self._runner.setup()
        self._ssl = listen_ssl(config)
        site = web.TCPSite(self._runner, config.listen.host, config.listen.port,
                           backlog=config.listen.backlog, ssl_context=self._ssl,
                           # Workers share the port; a lone worker must see "address in use".
                           reuse_port=config.workers > 1)
        await _bind(site, "listen", config.listen.host, config.listen.port)
        self.listen_port = _bound_port(site)
        if self.worker_id == 0:
            app = admin.admin_app(self._get_proxy, self.is_ready)
            self._admin_runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                               shutdown_timeout=CLOSE_GRACE_S)
            await self._admin_runner.setup()
            admin_site = web.TCPSite(self._admin_runner, config.admin.host, config.admin.port)
            await _bind(admin_site, "admin", config.admin.host, config.admin.port)
            self.admin_port = _bound_port(admin_site)
        self._spawn(self._refresh_gauges())
        # Everything allocated so far (config, policies, libraries) lives as
        # long as the worker: keep it out of the cyclic GC's scans, which
        # otherwise walk it on every full collection.
        gc.freeze()
        log.info("worker %d listening on %s:%s (admin %s), policy per cluster: %s", self.worker_id,
                 config.listen.host, self.listen_port, self.admin_port,
                 {n: c.policy_name for n, c in rt.clusters.items()})

    async def _start_extras(self, config: Config) -> tuple[Any, Any]:
        telemetry = None
        if config.telemetry.enabled:
            from proxy.telemetry import TelemetryRecorder

            self._telemetry_routes = config.route_classes()
            telemetry = TelemetryRecorder(config.telemetry, self._telemetry_routes, self.worker_id)
            await telemetry.start()
            self._extras.append(telemetry)
        forecaster = None
        if config.forecast.enabled:
            from proxy.forecast import LoadForecaster

            forecaster = LoadForecaster(config.forecast, workers=config.workers)
            await forecaster.start()
            self._extras.append(forecaster)
        return telemetry, forecaster

    def _get_proxy(self) -> Proxy:
        assert self.proxy is not None
        return self.proxy

    def is_ready(self) -> bool:
        return self.proxy is not None and not self.proxy.draining

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_gauges(self) -> None:
        while True:
            await asyncio.sleep(GAUGE_REFRESH_S)
            if self.proxy is not None:
                admin.refresh_gauges(self.proxy)

    def catch_sighup(self, held: Callable[[], bool] = lambda: False) -> None:
        """SIGHUP reloads the config from now on; until `serving()` it is held (as one from
        before this, `held()`) and applied then."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_hup)
        # Asked after the handler is in: a HUP in between lands in one or the other.
        self._hup_held = self._hup_held or held()

    def _on_hup(self) -> None:
        if self._serving:
            self._spawn(self.reload())
        elif not self._hup_held:
            self._hup_held = True
            log.info("SIGHUP during start-up: worker %d reloads the config once it serves", self.worker_id)

    def serving(self) -> None:
        """Started: SIGTERM and SIGINT drain from now on, and a held SIGHUP is applied."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        self._serving = True
        if self._hup_held:
            log.info("worker %d: applying the SIGHUP received during start-up", self.worker_id)
            self._spawn(self.reload())

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def reload(self) -> bool:
        """Re-read the config file; apply it if valid, else keep serving with the old one."""
        async with self._reload_lock:
            if self._stop.is_set():  # draining: nothing new is built now
                log.info("reload: ignored, the worker is stopping")
                return False
            return await self._reload()

    async def _reload(self) -> bool:
        proxy = self._get_proxy()
        try:
            # In a thread: validating loads model files (an anomaly model of a few MB
            # takes a second to build), which on the loop would stall every request.
            loaded = await asyncio.to_thread(load, self.config_path)
            file_config = loaded.config
            if self._stop.is_set():  # the worker began to stop while the file loaded
                log.info("reload: dropped, the worker is stopping")
                return False
            file_tls = loaded.config.listen.tls
            effective, held = held_for_restart(loaded.config, proxy.runtime.config)
            if held:
                log.warning("reload: not applied until a restart (the rest is): %s",
                            "; ".join(held))
                loaded = dataclasses.replace(loaded, config=effective)
            new_rt, retired = await runtime.build(loaded, proxy.runtime)
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.labels("invalid").inc()
            log.error("reload rejected, still serving the previous config:\n%s", exc)
            return False
        except Exception as exc:
            metrics.CONFIG_RELOADS.labels("error").inc()
            log.error("reload failed, still serving the previous config: %s", exc)
            return False
        old_rt, proxy.runtime = proxy.runtime, new_rt
        if loaded.config.listen.tls == file_tls:  # else held: the old pair, checked by nobody now
            self._reload_tls(loaded.config)
        routes = loaded.config.route_classes()
        if self._telemetry_routes is not None and routes != self._telemetry_routes:
            log.warning("reload: telemetry records the route classes it started with until a "
                        "restart (%s; now %s): requests of other classes count as 'other'",
                        self._telemetry_routes, routes)
        metrics.CONFIG_RELOADS.labels("applied").inc()
        log.info("reload: applied %s", self.config_path)
        if self._applied_copy is not None:
            self._keep_applied(file_config)
        # Checkers and policies serve no request: stop them now, so an old
        # health config stops judging backends at once.
        await runtime.retire(retired.now)
        if retired.upstreams:
            self._pending_upstreams.extend(retired.upstreams)
            self._spawn(self._close_when_idle(old_rt, retired.upstreams))
        return True

    def _keep_applied(self, applied: Config) -> None:
        """Copy the config file next to the one the workers started from, if it still says
        what was just applied (it may have changed since it was read)."""
        assert self._applied_copy is not None
        tmp = self._applied_copy.with_name(f"{self._applied_copy.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(self.config_path, tmp)
            if read_config(tmp) == applied:
                os.replace(tmp, self._applied_copy)
        except (OSError, ConfigError) as exc:
            log.warning("reload: could not keep a copy of the applied config: %s", exc)
        finally:
            tmp.unlink(missing_ok=True)

    def _reload_tls(self, config: Config) -> None:
        tls = config.listen.tls
        if tls is None or self._ssl is None:
            return
        # The loader has loaded this pair into a scratch context: one that does not match,
        # loaded here, would leave the live context with no usable key.
        try:
            self._ssl.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError) as exc:  # replaced since, a moment ago
            log.error("reload: the TLS files changed while being loaded, handshakes may fail "
                      "until the next reload: %s / %s: %s", tls.cert_file, tls.key_file, exc)

    async def _close_when_idle(self, old: runtime.Runtime, upstreams: list[Any]) -> None:
        """Close a replaced runtime's upstream pools once the requests that started on it are done."""
        deadline = asyncio.get_running_loop().time() + max(UPSTREAM_RETIRE_CAP_S, old.config.timeouts.total_s)
        while old.active > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(RETIRE_POLL_S)
        if old.active > 0:
            log.warning("reload: closing old upstream connections with %d request(s) still on them",
                        old.active)
        await runtime.retire(upstreams)
        for upstream in upstreams:
            self._pending_upstreams.remove(upstream)

    async def _drain(self, runner: web.BaseRunner) -> None:
        """Close the listener and idle connections at once; wait up to drain_s for the requests
        in progress, then cut those still going."""
        for site in list(runner.sites):
            await site.stop()
        # Connections accepted just before get their request under way (as aiohttp's cleanup).
        await asyncio.sleep(0)
        if runner.server is not None:
            runner.server.pre_shutdown()  # idle keep-alive connections now, busy ones after their answer
        proxy = self.proxy
        if proxy is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_s
        while proxy.active_requests and loop.time() < deadline:
            await asyncio.sleep(min(DRAIN_POLL_S, max(0.0, deadline - loop.time())))
        if proxy.active_requests:
            cut = await proxy.cut(CUT_GRACE_S)
            log.warning("worker %d: drain_s (%g s) is over: cut %d request(s) still in progress",
                        self.worker_id, self._drain_s, cut)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish for up to drain_s, cut the rest
        (a 503 where no response has started), then close."""
        if self.proxy is not None:
            self.proxy.draining = True
        if self._runner is not None:
            await self._drain(self._runner)
            await self._runner.cleanup()
        for task in list(self._tasks):
            task.cancel()
        await runtime.retire(self._pending_upstreams)
        metrics.HOT.flush()  # the last second of counts
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self.proxy is not None:
            await runtime.close(self.proxy.runtime)
            if self.proxy.access_log is not None:
                self.proxy.access_log.close()
        for extra in self._extras:
            await extra.stop()


class BindError(OSError):
    """A listening socket that cannot be opened; the message names the address and its fields."""


async def _bind(site: web.TCPSite, field: str, host: str, port: int) -> None:
    try:
        await site.start()
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve {field}.host {host!r}: {exc.strerror or exc}") from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise BindError(f"cannot bind {field} address {address} ({field}.host, {field}.port): "
                        f"{reason}") from None


def _bound_port(site: web.TCPSite) -> int | None:
    server = site._server  # aiohttp keeps the asyncio.Server here
    sockets = getattr(server, "sockets", None)
    if not sockets:
        return None
    port: int = sockets[0].getsockname()[1]
    return port


def report_ready() -> None:
    """Tell the supervisor this worker serves: one byte on the pipe it passed (none when alone)."""
    fd = os.environ.pop("FORETELL_READY_FD", None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"r")
    except OSError as exc:  # the supervisor is gone: its death signal follows
        log.warning("cannot tell the supervisor this worker is ready: %s", exc)
    finally:
        os.close(int(fd))


async def run(config_path: str | Path, worker_id: int, loaded: Loaded | None = None, *,
              hup_received: Callable[[], bool] = lambda: False,
              applied_copy: Path | None = None) -> int:
    """Serve until SIGTERM. `loaded`: the config as already read; `hup_received`: whether a
    SIGHUP came before this (held by the caller), to be applied once serving;
    `applied_copy`: where to keep a copy of each config file a reload applies."""
    os.environ["FORETELL_WORKER_ID"] = str(worker_id)
    worker = Worker(config_path, worker_id, applied_copy)
    # First: SIGHUP's default action would end the process while it starts.
    worker.catch_sighup(held=hup_received)
    try:
        await worker.start(loaded)
    except ConfigError as exc:
        log.error("%s", exc)
        await worker.stop()
        return 2
    except Exception as exc:
        # Bad model or coefficient files, busy ports: say what and where, no traceback.
        log.error("cannot start: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        await worker.stop()
        return 1
    worker.serving()
    report_ready()
    await worker.wait_stopped()
    log.info("worker %d draining", worker_id)
    await worker.stop()
    return 0
