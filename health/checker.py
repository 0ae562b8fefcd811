"""HealthChecker: runs probes and detectors for one cluster and applies decisions.

- Outcomes reach every detector through `cluster.on_outcome` (O(1) each).
- Every `ejection.evaluate_interval_s` (and at once when a backend starts
  failing in a row) the detectors are evaluated, their verdicts turned into
  findings (shadow mode applied), and `health.ejection.decide` says what to
  do. Decisions reach the data plane only through `cluster.set_health`.
- One probe loop per backend: `interval_s` while serving, `ejected_interval_s`
  while ejected, plus jitter; rise/fall hysteresis in `ProbeTracker`.

Every decision carries a reason: in the logs, in `cluster` (health_reason) and
in `describe()`, which the admin endpoint merges into /backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl as ssl_module
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

from health import metrics
from health.anomaly import RELOAD_OK, AnomalyDetector, AnomalyModel
from health.base import Detector, Prober, ProbeResult, Verdict
from health.config import HealthConfig
from health.consecutive import ConsecutiveFailures
from health.ejection import (
    ACTIVE,
    Action,
    BackendStatus,
    Finding,
    Plan,
    decayed_multiplier,
    decide,
    ejection_duration_s,
)
from health.latency import LatencyOutlier
from health.prober import HttpProber, ProbeTracker
from health.success_rate import SuccessRate
from proxy.state import Backend, BackendState, Clock, Cluster, Health, Outcome

log = logging.getLogger("foretell.health")

# After an early (failure-triggered) evaluation, wait at least this long before another.
_MIN_EARLY_GAP_S = 0.02
_HISTORY = 8


@dataclass
class _Record:
    """The checker's own memory of one backend (the cluster holds only the applied state)."""

    ejected: bool = False
    eject_until: float = 0.0
    ejected_at: float | None = None
    ejected_by: str = ""
    ejection_reason: str = ""
    multiplier: int = 0
    # Detectors currently detecting without enforcement, to count each episode once.
    held_back: set[str] = field(default_factory=set)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    history: deque[str] = field(default_factory=lambda: deque(maxlen=_HISTORY))


# Cluster name -> the checker whose state its gauges show (the one started last).
_CURRENT: weakref.WeakValueDictionary[str, HealthChecker] = weakref.WeakValueDictionary()


class HealthChecker:
    def __init__(self, cluster: Cluster, config: HealthConfig, *, clock: Clock = time.monotonic,
                 ssl: ssl_module.SSLContext | bool | None = None,
                 rng: random.Random | None = None, prober: Prober | None = None,
                 anomaly_model: AnomalyModel | None = None) -> None:
        self.cluster = cluster
        self.config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self.detectors: list[Detector] = []
        self._shadow: dict[str, bool] = {}
        self._consecutive: ConsecutiveFailures | None = None
        if config.consecutive.enabled:
            self._consecutive = ConsecutiveFailures(config.consecutive, clock)
            self._add(self._consecutive, config.consecutive.shadow)
        if config.success_rate.enabled:
            self._add(SuccessRate(config.success_rate, clock), config.success_rate.shadow)
        if config.latency.enabled:
            self._add(LatencyOutlier(config.latency, clock, self.waiting_age_s),
                      config.latency.shadow)
        self.anomaly: AnomalyDetector | None = None
        an = config.anomaly
        if an.model_path is not None or an.record_path is not None:
            # Raises AnomalyModelError (naming the file) when the model is missing or invalid.
            self.anomaly = AnomalyDetector(an, clock, cluster, self.probe_rtt_s, anomaly_model)
            self._add(self.anomaly, an.shadow)
            if self.anomaly.model is not None:
                self._anomaly_loaded(RELOAD_OK)
        self._prober: Prober | None = None
        if config.active.enabled:
            self._prober = prober or HttpProber(config.active, clock=clock, ssl=ssl)
        self._trackers: dict[str, ProbeTracker] = {}
        self._records: dict[str, _Record] = {}
        self.panic = False
        self._panic_reason = ""
        self._wake: asyncio.Event | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopped = False
        self._sync_members()
        cluster.on_outcome(self._on_outcome)

    def _add(self, detector: Detector, shadow: bool) -> None:
        self.detectors.append(detector)
        self._shadow[detector.name] = shadow

    # -- hot path -------------------------------------------------------------
    def _on_outcome(self, state: BackendState, outcome: Outcome) -> None:
        if self._stopped:  # stopping: outcomes already in flight are ignored
            return
        backend_id = state.backend.id
        for d in self.detectors:
            d.observe(backend_id, outcome)
        # A fresh failure streak is worth evaluating now, not in up to 250 ms.
        if (outcome.failed and self._wake is not None and self._consecutive is not None
                and state.health is not Health.EJECTED and self._consecutive.urgent(backend_id)):
            self._wake.set()

    # -- membership -----------------------------------------------------------
    def _sync_members(self) -> None:
        ids = set(self.cluster.states)
        for backend_id in ids - self._records.keys():
            record = self._records[backend_id] = _Record()
            tracker = self._trackers[backend_id] = ProbeTracker(self.config.active.rise,
                                                                self.config.active.fall)
            state = self.cluster.states[backend_id]
            if state.health is Health.EJECTED:
                # Taking over from a previous checker (config reload): keep it out until
                # it has served a base ejection time and passed probes, as if just ejected.
                now = self._clock()
                record.ejected, record.ejected_at = True, now
                record.eject_until = now + self.config.ejection.base_ejection_s
                record.ejected_by = "previous checker"
                record.ejection_reason = f"previous checker: {state.health_reason}"
                record.multiplier = 1
                tracker.mark_down()
            metrics.set_state(self.cluster.name, backend_id, state.health.value)
        for backend_id in self._records.keys() - ids:
            del self._records[backend_id]
            del self._trackers[backend_id]
            task = self._tasks.pop(backend_id, None)
            if task is not None:
                task.cancel()
            for d in self.detectors:
                d.forget(backend_id)
            metrics.forget_backend(self.cluster.name, backend_id)
        if self._wake is not None and self._prober is not None:
            for backend_id, state in self.cluster.states.items():
                if backend_id not in self._tasks:
                    self._tasks[backend_id] = asyncio.create_task(
                        self._probe_loop(state.backend), name=f"probe {backend_id}")

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        if self._wake is not None:
            return
        self._wake = asyncio.Event()
        # This checker starts out of panic: a replaced one may have left the gauge at 1.
        metrics.panic.labels(self.cluster.name).set(0.0)
        self._sync_members()
        # The cluster's gauges are this checker's now; series only its predecessor had
        # (backends a reload removed, an anomaly model no longer configured) go.
        name = self.cluster.name
        previous = _CURRENT.get(name)
        _CURRENT[name] = self
        if previous is not None and previous is not self:
            for backend_id in previous._records.keys() - self._records.keys():
                metrics.forget_backend(name, backend_id)
        had_model = previous is not None and previous.anomaly is not None \
            and previous.anomaly.model is not None
        if had_model and (self.anomaly is None or self.anomaly.model is None):
            metrics.forget_cluster_anomaly(name)
        self._tasks["\0evaluate"] = asyncio.create_task(self._evaluate_loop(),
                                                         name=f"health {self.cluster.name}")
        if self.anomaly is not None and self.anomaly.config.model_path is not None:
            self._tasks["\0anomaly model"] = asyncio.create_task(
                self._anomaly_reload_loop(), name=f"anomaly model {self.cluster.name}")

    async def stop(self) -> None:
        self._stopped = True
        if _CURRENT.get(self.cluster.name) is self:  # not replaced: the cluster is gone
            del _CURRENT[self.cluster.name]
            for backend_id in self._records:
                metrics.forget_backend(self.cluster.name, backend_id)
            metrics.forget_cluster(self.cluster.name)
        self.cluster.remove_outcome_listener(self._on_outcome)
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._wake = None
        if self._prober is not None:
            await self._prober.close()

    async def _evaluate_loop(self) -> None:
        assert self._wake is not None
        interval_s = self.config.ejection.evaluate_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval_s)
            self._wake.clear()
            try:
                self._sync_members()
                self.evaluate()
            except Exception:  # a bug here must not silently stop health checking
                log.exception("cluster %s: health evaluation failed", self.cluster.name)
            await asyncio.sleep(_MIN_EARLY_GAP_S)

    async def _anomaly_reload_loop(self) -> None:
        """Reload the anomaly model when its file changes, every anomaly `interval_s`, beside
        the evaluations: they go on with the old model while the new one loads."""
        assert self.anomaly is not None
        while True:
            await asyncio.sleep(self.anomaly.config.interval_s)
            try:
                result = await self.anomaly.check_reload()
                if result is not None:
                    self._anomaly_loaded(result)
            except Exception:  # a bug here must not silently stop reloading
                log.exception("cluster %s: anomaly model reload failed", self.cluster.name)

    def _anomaly_loaded(self, result: str) -> None:
        """Count a (re)load of the anomaly model; show the threshold of the one scoring."""
        assert self.anomaly is not None
        metrics.anomaly_reloads.labels(self.cluster.name, result).inc()
        if self.anomaly.model is not None:
            metrics.anomaly_threshold.labels(self.cluster.name).set(self.anomaly.model.threshold)

    async def _probe_loop(self, backend: Backend) -> None:
        assert self._prober is not None
        cfg = self.config.active
        # Spread the first probes so a fleet is not probed in lockstep.
        await asyncio.sleep(self._rng.uniform(0, min(cfg.interval_s, 0.5)))
        while True:
            result = await self._prober.probe(backend)
            self.on_probe(backend.id, result)
            record = self._records.get(backend.id)
            base_s = cfg.ejected_interval_s if record is not None and record.ejected \
                else cfg.interval_s
            await asyncio.sleep(base_s + self._rng.uniform(0, cfg.jitter_s))

    def on_probe(self, backend_id: str, result: ProbeResult) -> None:
        tracker = self._trackers.get(backend_id)
        if tracker is None:
            return
        metrics.probes.labels(self.cluster.name, backend_id, "ok" if result.ok else "fail").inc()
        if result.status:
            metrics.probe_duration.labels(self.cluster.name, backend_id).observe(result.rtt_s)
        if tracker.observe(result):
            log.info("cluster %s: backend %s probe %s: %s", self.cluster.name, backend_id,
                     "up" if tracker.up else "down", tracker.describe())
            if self._wake is not None:
                self._wake.set()

    def waiting_age_s(self, backend_id: str) -> float | None:
        """Age of the backend's oldest attempt still waiting for its response (cluster clock)."""
        state = self.cluster.states.get(backend_id)
        if state is None or state.waiting_since is None:
            return None
        return self.cluster.clock() - state.waiting_since

    def probe_rtt_s(self, backend_id: str) -> float | None:
        tracker = self._trackers.get(backend_id)
        if tracker is None or tracker.last is None or not tracker.last.ok:
            return None
        return tracker.last.rtt_s

    # -- the decision step (synchronous; tests call it with an injected clock) ----
    def evaluate(self) -> Plan:
        now = self._clock()
        by_backend: dict[str, list[Finding]] = {b: [] for b in self._records}
        for d in self.detectors:
            for v in d.evaluate(now):
                record = self._records.get(v.backend_id)
                if record is None:
                    continue
                record.verdicts[d.name] = v
                if v.detected:
                    by_backend[v.backend_id].append(
                        Finding(d.name, v.reason, v.score, enforced=not self._shadow[d.name],
                                unreachable=v.unreachable))
        active = self.config.active
        statuses = []
        for backend_id, record in self._records.items():
            tracker = self._trackers[backend_id]
            findings = by_backend[backend_id]
            if active.enabled and not tracker.up and not record.ejected:
                findings.append(Finding(ACTIVE, f"active probe {tracker.describe()}", math.inf,
                                        enforced=not active.shadow, hard=True,
                                        unreachable=True))
            statuses.append(BackendStatus(backend_id, record.ejected, record.eject_until,
                                          tracker.up if active.enabled else None,
                                          tuple(findings)))
        # A cluster told not to route to all with nothing ready (panic_routing: false)
        # does not panic here either: its ejections apply and it answers 503.
        threshold = self.config.ejection.panic_threshold_percent if self.cluster.panic_routing \
            else 0.0
        plan = decide(statuses, now, self.config.ejection.max_ejection_percent, threshold)
        self._apply(plan, statuses, now)
        return plan

    def _apply(self, plan: Plan, statuses: list[BackendStatus], now: float) -> None:
        name = self.cluster.name
        cfg = self.config.ejection
        findings = {st.backend_id: st.findings for st in statuses}
        for d in plan.decisions:
            record = self._records[d.backend_id]
            if d.action is Action.EJECT:
                mult = decayed_multiplier(record.multiplier, record.ejected_at, now,
                                          cfg.multiplier_decay_s) + 1
                if d.unreachable and self.config.active.enabled:
                    # A crashed backend is back when it answers probes again; keeping it
                    # out longer only costs capacity (the probes' rise is the gate).
                    duration_s = min(cfg.unreachable_ejection_s, cfg.base_ejection_s)
                else:
                    duration_s = ejection_duration_s(cfg.base_ejection_s, cfg.max_ejection_s,
                                                     mult)
                record.ejected = True
                record.multiplier = mult
                record.ejected_at = now
                record.eject_until = now + duration_s + self._rng.uniform(0, cfg.readmit_jitter_s)
                record.ejected_by = d.detector
                record.ejection_reason = d.reason
                record.held_back.discard(d.detector)
                if self.config.active.enabled:
                    self._trackers[d.backend_id].mark_down()
                metrics.ejections.labels(name, d.detector, "enforced").inc()
                self._note(d.backend_id, now, f"ejected for {duration_s:.1f} s (#{mult}) by {d.reason}")
                log.warning("cluster %s: ejected %s for %.1f s (ejection #%d) by %s", name,
                            d.backend_id, duration_s, mult, d.reason)
            elif d.action is Action.READMIT:
                record.ejected = False
                for det in self.detectors:
                    det.forget(d.backend_id)
                record.verdicts.clear()
                metrics.readmissions.labels(name).inc()
                self._note(d.backend_id, now, d.reason)
                log.info("cluster %s: %s %s after %.1f s (ejected by %s)", name, d.backend_id,
                         d.reason, now - (record.ejected_at or now), record.ejected_by)
            # Count each detector's held-back detection (shadow or guard) once per episode.
            held = {f.detector for f in findings[d.backend_id]} if d.action is Action.SUSPECT \
                else set()
            for held_name in held - record.held_back:
                metrics.ejections.labels(name, held_name, "detected").inc()
                log.info("cluster %s: %s detected by %s, not ejected: %s", name, d.backend_id,
                         held_name, d.reason)
            record.held_back = held
        if plan.panic != self.panic:
            if plan.panic:
                log.warning("cluster %s: %s", name, plan.panic_reason)
            else:
                log.warning("cluster %s: panic over, ejections apply again", name)
            metrics.panic.labels(name).set(1.0 if plan.panic else 0.0)
        self.panic = plan.panic
        self._panic_reason = plan.panic_reason
        for d in plan.decisions:
            record = self._records[d.backend_id]
            if record.ejected:
                if plan.panic:
                    health, reason = Health.SUSPECT, f"{plan.panic_reason}; {record.ejection_reason}"
                else:
                    health = Health.EJECTED
                    reason = (f"ejected by {record.ejection_reason} "
                              f"({max(0.0, record.eject_until - now):.1f} s left"
                              f"{'' if now < record.eject_until else ', waiting for probes'})")
            elif d.action is Action.SUSPECT:
                health, reason = Health.SUSPECT, d.reason
            else:
                health, reason = Health.HEALTHY, d.reason
            state = self.cluster.states.get(d.backend_id)
            if state is None or (state.health is health and state.health_reason == reason):
                continue
            previous = state.health
            self.cluster.set_health(d.backend_id, health, reason)
            if previous is not health:
                metrics.set_state(name, d.backend_id, health.value)
                if health is Health.SUSPECT or previous is Health.SUSPECT:
                    log.info("cluster %s: %s %s -> %s: %s", name, d.backend_id, previous.value,
                             health.value, reason)
        if self.anomaly is not None:
            for backend_id, score in self.anomaly.scores.items():
                metrics.anomaly_score.labels(name, backend_id).set(score)

    def _note(self, backend_id: str, now: float, text: str) -> None:
        self._records[backend_id].history.append(f"t={now:.3f} {text}")

    # -- introspection ----------------------------------------------------------
    def describe(self, backend_id: str) -> dict[str, object]:
        record = self._records.get(backend_id)
        state = self.cluster.states.get(backend_id)
        if record is None or state is None:
            return {}
        now = self._clock()
        out: dict[str, object] = {
            "health": state.health.value,
            "reason": state.health_reason,
            "ejected": record.ejected,
            "ejections": state.ejections,
            "ejection_multiplier": record.multiplier,
            "panic": self.panic,
            "verdicts": {name: v.as_dict() for name, v in record.verdicts.items()},
            "history": list(record.history),
        }
        if record.ejected:
            out["ejected_by"] = record.ejected_by
            out["ejection_reason"] = record.ejection_reason
            out["ejected_for_s"] = round(max(0.0, record.eject_until - now), 3)
        if self.anomaly is not None and backend_id in self.anomaly.scores:
            out["anomaly_score"] = round(self.anomaly.scores[backend_id], 4)
        if self.config.active.enabled:
            tracker = self._trackers[backend_id]
            rtt = self.probe_rtt_s(backend_id)
            out["probe"] = {"up": tracker.up, "state": tracker.describe(),
                            "rtt_ms": None if rtt is None else round(rtt * 1e3, 3)}
        return out
