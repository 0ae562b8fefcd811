"""Latency-outlier detector: a backend much slower than the fleet, even if it answers 200.

This is the case Envoy cannot eject (envoyproxy/envoy#288). Guarded against
HAProxy's warning (latency-based disabling taking out a whole pool): the
comparison is relative to the fleet's median, needs a minimum volume and
several judged backends, and the checker's max_ejection_percent caps it.

Two rules, both against the fleet (the median over judged backends):
- window: the backend's quantile (p90) over its recent samples reaches
  limit = max(ratio x fleet median p90, + min_excess_s), on at least two
  answers past the limit or one request still waiting past it (at 8-9
  samples p90 is the maximum, and one slow answer alone is noise);
- recent: the geometric mean of its last `recent_requests` attempts (by start
  time) reaches max(ratio x fleet median p50, + min_excess_s). Good routing
  starves a slow backend once its first slow answers come back, so its
  window stays full of fast samples from before the slowdown and fills with
  new ones only at the policy's exploration rate; the last few attempts show
  the change at once. They may have finished before the window, up to
  `recent_max_age_s` ago (30 s, or window_s if longer): a backend starved below `recent_requests` answers
  per window (7x the fleet, one request every 2 s) is judged all the same,
  where the window rule never has enough samples of it. The mean of log latencies is the efficient estimate of
  a lognormal's median, so it is judged against the fleet's median. Each
  attempt counts as at most 2 x ratio slower, so three requests caught in a
  brief stall next to two ordinary ones do not decide alone (3 ln 8 < 5 ln 4).
  It judges a change: the geometric mean must also be 2x the median of the
  backend's earlier samples (those kept, `max_samples`, even from before the
  window; when there are at least as many), unless that median is past the
  limit itself (an outlier all along, starved of traffic by routing).
  A backend that has always been ~3x the fleet is the window rule's to judge:
  the geometric mean of five lognormal (sigma 0.5) samples of it passes 4x
  one time in ten (ln(4/3) is 1.29 of its standard deviations), which
  ejected the demo's 3x slower backend again and again.

Like with like: under request-aware routing (onnx_latency) one backend may
get the expensive route class and another the cheap one (the demo fleet,
/render 6x /search: a render-serving backend was ejected as "4.9x fleet
median"). So each sample is first scaled to the cheapest route class's terms
(health.route_mix.route_factors, which says how a class's reference is
chosen), and times in verdicts marked "route-adjusted" are in those terms.
`route_adjusted: false` compares raw latencies.

Requests still waiting count as censored observations: the oldest waiting
attempt (BackendState.waiting_since, via `waiting_age_s`) will take at least
its current age, so once that age passes the window limit it counts as a
slow observation before it completes (a younger one is left out: it could
still go either way). Only completed samples set the fleet reference.

`observe` appends (time, latency, route class) to a bounded deque; `evaluate` sorts.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable

from health.base import Verdict
from health.config import LatencyOutlier as LatencyConfig
from health.route_mix import route_factors
from proxy.state import Clock, Outcome

# backend id -> age in seconds of its oldest attempt still waiting for a response, or None.
WaitingAge = Callable[[str], float | None]

# In the recent rule one attempt counts as at most this x ratio slower than the fleet.
_CAP_FACTOR = 2.0
# ...and the last attempts must be this many times slower than the backend's earlier
# kept samples (their median), when it has as many earlier as recent ones and that
# median is not past the limit itself.
_CHANGE_FACTOR = 2.0


def nearest_rank(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile (0..100) of an ascending, non-empty list."""
    rank = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[rank]


class LatencyOutlier:
    name = "latency"

    def __init__(self, config: LatencyConfig, clock: Clock,
                 waiting_age_s: WaitingAge | None = None) -> None:
        self.config = config
        self._clock = clock
        self._waiting_age_s = waiting_age_s
        self._samples: dict[str, deque[tuple[float, float, str]]] = {}

    def observe(self, backend_id: str, outcome: Outcome) -> None:
        # Transport errors have no service time; the failure detectors own them.
        if outcome.error_kind is not None:
            return
        samples = self._samples.get(backend_id)
        if samples is None:
            samples = self._samples[backend_id] = deque(maxlen=self.config.max_samples)
        samples.append((self._clock(), outcome.latency_s, outcome.route_class))

    def _recent(self, now: float) -> dict[str, list[tuple[float, float, str]]]:
        """Per backend: (finished at, latency, route class) of samples inside the window,
        oldest first."""
        horizon = now - self.config.window_s
        return {b: [s for s in samples if s[0] >= horizon] for b, samples in self._samples.items()}

    def evaluate(self, now: float) -> list[Verdict]:
        cfg = self.config
        raw = self._recent(now)
        factors = route_factors(raw) if cfg.route_adjusted else {}
        # (started at, latency scaled by its route class's factor)
        recent = {b: [(t - lat, lat * factors.get(rc, 1.0)) for t, lat, rc in s]
                  for b, s in raw.items()}
        ordered = {b: sorted(lat for _, lat in s) for b, s in recent.items()}
        q = {b: (len(lat), nearest_rank(lat, cfg.quantile) if lat else math.nan)
             for b, lat in ordered.items()}
        judged = [v for n, v in q.values() if n >= cfg.min_requests]
        verdicts = []
        if len(judged) < cfg.min_hosts:
            for backend_id in q:
                verdicts.append(Verdict(backend_id, self.name, False,
                                        f"fleet too small to compare ({len(judged)} backends "
                                        f"with >= {cfg.min_requests} samples)", 0.0))
            return verdicts
        fleet_s = statistics.median(judged)
        limit_s = max(fleet_s * cfg.ratio, fleet_s + cfg.min_excess_s)
        fleet_p50_s = statistics.median(
            nearest_rank(lat, 50.0) for lat in ordered.values() if len(lat) >= cfg.min_requests)
        adjusted = "route-adjusted " if factors else ""
        horizon = now - cfg.window_s
        for backend_id, samples in recent.items():
            # Kept samples older than the window, (started at, latency, finished at): the
            # recent rule's last attempts when the window holds too few (a starved
            # backend), and part of its "before" (too few for a median of their own).
            older = [(t - lat, lat * factors.get(rc, 1.0), t)
                     for t, lat, rc in self._samples[backend_id] if t < horizon]
            # (started at, latency or its lower bound, censored)
            obs = [(start, lat, False) for start, lat in samples]
            age_s = self._waiting_age_s(backend_id) if self._waiting_age_s is not None else None
            if age_s is not None:
                # Its route class is not known here: scaled as the most expensive class's,
                # so it stays a lower bound whatever the class.
                bound_s = age_s * min(factors.values(), default=1.0)
                # A younger waiting attempt says nothing yet about the limit either way.
                if bound_s >= limit_s:
                    obs.append((now - age_s, bound_s, True))
            verdicts.append(self._judge(backend_id, now, obs, older, fleet_s, limit_s,
                                        fleet_p50_s, adjusted))
        return verdicts

    def _judge(self, backend_id: str, now: float, obs: list[tuple[float, float, bool]],
               older: list[tuple[float, float, float]], fleet_s: float, limit_s: float,
               fleet_p50_s: float, adjusted: str) -> Verdict:
        """`older`: the backend's kept samples from before the window, (started at,
        latency on the same scale as `obs`, finished at). `adjusted`: "route-adjusted "
        when latencies were scaled by route class."""
        cfg = self.config
        label = f"{adjusted}p{cfg.quantile:g}"
        n = len(obs)
        window: Verdict | None = None
        if n >= cfg.min_requests:
            # A censored value is a lower bound, so the quantile is one too.
            value_s = nearest_rank(sorted(v for _, v, _ in obs), cfg.quantile)
            over = value_s >= limit_s
            # One answer alone never decides (at 8-9 samples p90 is the maximum: one slow
            # request of a ~3x backend would); a request still waiting past the limit
            # does (a hang is evidence enough).
            past = [c for _, v, c in obs if v >= limit_s]
            detected = over and (len(past) >= 2 or any(past))
            alone = ", but 1 answer alone" if over and not detected else ""
            ratio = _ratio(value_s, fleet_s)
            waiting = " (1 still waiting)" if any(c for *_, c in obs) else ""
            window = Verdict(backend_id, self.name, detected,
                             f"{label} {value_s * 1e3:.1f} ms over {n} samples{waiting} = "
                             f"{ratio:.1f}x fleet median {fleet_s * 1e3:.1f} ms "
                             f"({'>=' if over else '<'} limit {limit_s * 1e3:.1f} ms{alone})",
                             ratio)
            if detected:
                return window
        m = cfg.recent_requests
        aged_out = now - cfg.recent_horizon_s
        by_start = sorted([*((start, v, False) for start, v, t in older if t >= aged_out), *obs])
        last = by_start[-m:] if m else []
        recent = ""
        if m and len(last) == m and fleet_p50_s > 0:
            recent_limit_s = max(fleet_p50_s * cfg.ratio, fleet_p50_s + cfg.min_excess_s)
            cap = math.log(_CAP_FACTOR * cfg.ratio)
            log_ratio = sum(min(cap, math.log(max(v, 1e-9) / fleet_p50_s)) for _, v, _ in last) / m
            recent_ratio = math.exp(log_ratio)
            over = fleet_p50_s * recent_ratio >= recent_limit_s
            detected = over
            # A change, not a steady state: the rule is for a backend whose window still
            # holds its fast samples from before. One that has always been ~3x slower is
            # the window rule's to judge (its p90 over more samples), else the noise of
            # five samples ejects it again and again. One whose earlier median is past
            # the limit itself was an outlier all along: no change needed.
            unchanged = ""
            earlier = sorted([*(v for _, v, _ in by_start[:-m]),
                              *(v for _, v, t in older if t < aged_out)]) if over else []
            if len(earlier) >= m:
                before_s = nearest_rank(earlier, 50.0)
                if before_s < recent_limit_s and \
                        fleet_p50_s * recent_ratio < _CHANGE_FACTOR * before_s:
                    detected = False
                    unchanged = (f", but < {_CHANGE_FACTOR:g}x its earlier median "
                                 f"{before_s * 1e3:.1f} ms")
            waiting = " incl. 1 still waiting" if any(c for *_, c in last) else ""
            # Named when the window alone held too few of them (a starved backend).
            span = f" over {now - last[0][0]:.0f} s" if last[0][0] < now - cfg.window_s else ""
            recent = (f"last {m} requests{span}{waiting}: {adjusted}geometric mean {recent_ratio:.1f}x fleet "
                      f"median p50 {fleet_p50_s * 1e3:.1f} ms ({'>=' if over else '<'} "
                      f"{recent_limit_s / fleet_p50_s:.1f}x{unchanged})")
            if detected:
                shown = ", ".join(f"{v * 1e3:.0f}{'+' if c else ''}" for _, v, c in last)
                return Verdict(backend_id, self.name, True, f"{recent}: {shown} ms", recent_ratio)
        if window is not None:
            return window
        return Verdict(backend_id, self.name, False,
                       f"{n} samples in {cfg.window_s:g} s (< {cfg.min_requests}, not judged)"
                       + (f"; {recent}" if recent else ""), 0.0)

    def forget(self, backend_id: str) -> None:
        self._samples.pop(backend_id, None)


def _ratio(value_s: float, fleet_s: float) -> float:
    """value / fleet, finite (a score must sort)."""
    return value_s / fleet_s if fleet_s > 0 else 1e9
