"""Off-policy estimate of a new model's latency on logged traffic (`foretell train evaluate`).

Each logged decision holds every candidate's features, the chosen backend a,
its logged propensity p = P_log(a | decision), and the observed latency y
(failures cost `failure_cost_ms`, as in training). The new model scores the
candidates the way `onnx_latency` would (prediction + failure penalty x
error rate; no online correction) and its target policy pi is "best, with
epsilon-uniform exploration". With w = pi(a | x) / p:

    IPS   = mean(w * y)
    SNIPS = sum(w * y) / sum(w)                        (self-normalised)
    DM    = mean over decisions of the model's own prediction for pi's choice
    DR    = DM + mean(w * (y - prediction for a))       (doubly robust)

beside the logged policy's actual mean latency. Also reported: how often pi
agrees with the log, the effective sample size (sum w)^2 / sum w^2, and
weighted p50/p99 of y under pi (SNIPS weights).

Decisions logged without a propensity (a deterministic logger) carry no
information about other choices and are left out, and counted. Caveat:
these estimates hold each decision's outcome fixed, so they ignore how
routing changes queueing at the backends (interference); the bench measures
that, this only ranks models before deploying them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policies.features import ERROR_RATE
from train.dataset import Telemetry, decision_groups

# Below either, the weighted estimates rest on too few decisions to trust (and say so).
MIN_EFFECTIVE_SAMPLE = 100
MIN_EFFECTIVE_SHARE = 0.02


class EvaluateError(Exception):
    pass


@dataclass
class Estimate:
    decisions: int
    skipped_no_propensity: int
    # Decisions logged without exploration on which the new model picks another backend.
    unsupported: int
    logged_mean_ms: float
    logged_p50_ms: float
    logged_p99_ms: float
    ips_ms: float
    snips_ms: float
    dm_ms: float
    dr_ms: float
    match_rate: float
    effective_sample_size: float
    target_p50_ms: float
    target_p99_ms: float

    def lines(self) -> list[str]:
        return [
            f"decisions evaluated        {self.decisions}"
            + (f" ({self.skipped_no_propensity} without a propensity left out)"
               if self.skipped_no_propensity else ""),
            f"logged policy, actual      mean {self.logged_mean_ms:8.3f} ms   "
            f"p50 {self.logged_p50_ms:8.3f} ms   p99 {self.logged_p99_ms:8.3f} ms",
            f"new model, IPS             mean {self.ips_ms:8.3f} ms",
            f"new model, SNIPS           mean {self.snips_ms:8.3f} ms   "
            f"p50 {self.target_p50_ms:8.3f} ms   p99 {self.target_p99_ms:8.3f} ms",
            f"new model, direct method   mean {self.dm_ms:8.3f} ms",
            f"new model, doubly robust   mean {self.dr_ms:8.3f} ms",
            f"agreement with the log     {self.match_rate:8.1%}   "
            f"effective sample size {self.effective_sample_size:.0f}",
            *self.warnings(),
        ]

    def warnings(self) -> list[str]:
        """What makes these estimates unreliable, in words (empty when nothing does)."""
        out = []
        if self.unsupported:
            out.append(f"warning: on {self.unsupported} of {self.decisions} decisions the "
                       "logged policy did not explore (propensity 1) and the new model "
                       "would choose another backend, whose outcome nobody saw: every "
                       "estimate but the logged one is biased there. Log with exploration "
                       "(epsilon > 0) on every decision")
        ess = self.effective_sample_size
        if ess < MIN_EFFECTIVE_SAMPLE or ess < MIN_EFFECTIVE_SHARE * self.decisions:
            out.append(f"warning: the importance-weighted estimates (IPS, SNIPS, doubly "
                       f"robust) rest on ~{ess:.0f} of {self.decisions} decisions: the "
                       "logged policy rarely chose what the new model would. Log with more "
                       "exploration (a larger epsilon) before trusting them (the direct "
                       "method uses no weights, but it is the model's own prediction)")
        return out


def _weighted_quantile(y: np.ndarray, w: np.ndarray, q: float) -> float:
    mask = w > 0
    if not mask.any():
        return float("nan")
    order = np.argsort(y[mask])
    ys, ws = y[mask][order], w[mask][order]
    cum = np.cumsum(ws) / ws.sum()
    return float(ys[min(len(ys) - 1, int(np.searchsorted(cum, q)))])


def off_policy(data: Telemetry, predict: Any, *, epsilon: float = 0.0,
               failure_penalty_ms: float = 1000.0, failure_cost_ms: float = 1000.0) -> Estimate:
    """`predict(x) -> ms per row` scores every logged candidate."""
    rec = data.records
    starts, chosen_rows = decision_groups(rec)
    n_dec = len(starts) - 1
    if n_dec == 0:
        raise EvaluateError("no decisions to evaluate")
    x = np.ascontiguousarray(rec["features"], dtype=np.float32)
    pred = np.asarray(predict(x), dtype=np.float64).reshape(-1)
    score = pred + failure_penalty_ms * x[:, ERROR_RATE]
    group_of = np.repeat(np.arange(n_dec), np.diff(starts))
    # Best candidate per decision: the minimum score, first on ties.
    min_score = np.minimum.reduceat(score, starts[:-1])
    is_min = score == min_score[group_of]
    best = np.full(n_dec, -1)
    first_min = np.flatnonzero(is_min)
    best_rows = first_min[np.unique(group_of[first_min], return_index=True)[1]]
    best[:] = best_rows
    sizes = np.diff(starts).astype(np.float64)
    chosen = rec[chosen_rows]
    y = chosen["latency_s"].astype(np.float64) * 1e3
    failed = (chosen["error_kind"] != 0) | (chosen["status"] >= 500) | (chosen["status"] == 0)
    y = np.where(failed, np.maximum(y, failure_cost_ms), y)
    p_log = chosen["propensity"].astype(np.float64)
    has_p = ~np.isnan(p_log)
    skipped = int((~has_p).sum())
    if not has_p.any():
        raise EvaluateError(
            "the logged policy reported no propensities (deterministic routing); off-policy "
            "estimates need logged exploration: collect with `kind: explore` or onnx_latency "
            "with epsilon > 0")
    agree = (chosen_rows == best)
    # A propensity of 1: the logger did not explore on that decision (onnx_latency or
    # explore with epsilon 0), so any other backend had probability 0. Where the new
    # model picks another, its outcome is unobserved: IPS counts it as 0 ms, SNIPS drops
    # it, DR takes the model's word for it. Biased, and the weights cannot show it.
    deterministic = has_p & (p_log >= 1.0 - 1e-6)
    if deterministic.sum() == has_p.sum():
        raise EvaluateError(
            "the logged policy never explored (propensity 1 on every decision): the "
            "outcome of any other choice is unobserved, so off-policy estimates would be "
            "biased; collect with `kind: explore` or onnx_latency with epsilon > 0")
    unsupported = int((deterministic & ~agree).sum())
    pi = epsilon / sizes + (1.0 - epsilon) * agree
    keep = has_p
    w = pi[keep] / p_log[keep]
    yk = y[keep]
    pred_a = pred[chosen_rows][keep]
    dm_terms = pred[best][keep]
    if epsilon > 0:
        # The model's expected prediction under pi: (1-eps)*best + eps*mean over candidates.
        mean_pred = np.add.reduceat(pred, starts[:-1]) / sizes
        dm_terms = (1.0 - epsilon) * pred[best][keep] + epsilon * mean_pred[keep]
    ips = float(np.mean(w * yk))
    snips = float(np.sum(w * yk) / np.sum(w)) if np.sum(w) > 0 else float("nan")
    dm = float(np.mean(dm_terms))
    dr = dm + float(np.mean(w * (yk - pred_a)))
    ess = float(np.sum(w) ** 2 / np.sum(w ** 2)) if np.sum(w ** 2) > 0 else 0.0
    return Estimate(
        decisions=int(keep.sum()), skipped_no_propensity=skipped, unsupported=unsupported,
        logged_mean_ms=float(np.mean(yk)), logged_p50_ms=float(np.quantile(yk, 0.5)),
        logged_p99_ms=float(np.quantile(yk, 0.99)), ips_ms=ips, snips_ms=snips, dm_ms=dm,
        dr_ms=dr, match_rate=float(np.mean(agree[keep])), effective_sample_size=ess,
        target_p50_ms=_weighted_quantile(yk, w, 0.5), target_p99_ms=_weighted_quantile(yk, w, 0.99))


def onnx_predictor(model_path: str | Path) -> Any:
    """A batch predictor from a model file, validated like the proxy validates it."""
    from policies.onnx_latency import load_model

    model = load_model(model_path)

    def predict(x: np.ndarray) -> np.ndarray:
        return model.predict_ms(x)

    return predict, model
