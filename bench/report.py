"""Tables and plots from a bench run's results.json.

Repeats are combined by their median (these machines are noisy; compare
policies within one run, never across runs). Plots per scenario and
utilisation: the latency CDF per policy on a "nines" axis, and p99 per
one-second window over time with the scripted events shaded.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.scenarios import SCENARIOS

METRICS = ("p50_ms", "p99_ms", "p999_ms", "error_rate", "goodput_rps", "proxy_cpu_us_per_req")


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, utilisation, policy): medians over repeats, in run order."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["scenario"], r["utilisation"], r["policy"])].append(r)
    rows = []
    for (sc, u, pol), rs in groups.items():
        good = [r for r in rs if "failed" not in r]
        row: dict[str, Any] = {"scenario": sc, "utilisation": u, "policy": pol,
                               "repeats": len(good), "failed": len(rs) - len(good)}
        if good:
            for m in METRICS:
                row[m] = _median([r.get(m) for r in good])
            ids = sorted({b for r in good for b in r["backend_share"]})
            row["backend_share"] = {b: _median([r["backend_share"].get(b, 0.0) for r in good])
                                    for b in ids}
            row["code"] = good[0]["code"]
        else:
            row["error"] = rs[0]["failed"]
        rows.append(row)
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def vs_best_other(row: dict[str, Any], rows: Sequence[dict[str, Any]], metric: str) -> float | None:
    """row[metric] over the best (lowest) value among the *other* rows: below 1, the row
    beats every other policy by that factor; above 1, it is that far behind the best."""
    others = [r[metric] for r in rows if r is not row and r.get(metric) is not None]
    if row.get(metric) is None or not others or min(others) <= 0:
        return None
    return float(row[metric]) / min(others)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One table per scenario and utilisation, policies as rows, with p50 and p99 ratios to
    the best of the other policies."""
    out = []
    by_key: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_key[(r["scenario"], r["utilisation"])].append(r)
    for (sc, u), rs in by_key.items():
        scenario = SCENARIOS.get(sc)
        code = scenario.code if scenario else ""
        desc = scenario.description if scenario else ""
        out.append(f"### {code} {sc} at {u * 100:g}% load — {desc}\n")
        out.append("| policy | p50 ms | p99 ms | p99.9 ms | p50 ÷ best other | p99 ÷ best other "
                   "| errors | goodput req/s | proxy CPU µs/req | backend share % |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rs:
            if r.get("p99_ms") is None:
                out.append(f"| {r['policy']} | failed: {r.get('error', '?')[:80]} "
                           "| | | | | | | | |")
                continue
            share = "/".join(f"{v * 100:.0f}" for v in r["backend_share"].values())
            out.append(
                f"| {r['policy']} | {_fmt(r['p50_ms'], '.1f')} | {_fmt(r['p99_ms'], '.1f')} "
                f"| {_fmt(r['p999_ms'], '.1f')} | {_fmt(vs_best_other(r, rs, 'p50_ms'), '.2f')} "
                f"| {_fmt(vs_best_other(r, rs, 'p99_ms'), '.2f')} "
                f"| {r['error_rate'] * 100:.2f}% | {_fmt(r['goodput_rps'], '.0f')} "
                f"| {_fmt(r['proxy_cpu_us_per_req'], '.0f')} | {share} |")
        ids = next((list(r["backend_share"]) for r in rs if "backend_share" in r), [])
        if ids:
            out.append(f"\nbackend share order: {', '.join(ids)} (share of all requests; "
                       "failures without a response carry no backend id)\n")
        else:
            out.append("")
    return "\n".join(out)


def plot(runs: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Two-panel PNG per (scenario, utilisation); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bench.runner import CDF_POINTS

    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if "failed" not in r:
            groups[(r["scenario"], r["utilisation"])].append(r)
    written = []
    nines = -np.log10(np.maximum(1e-4, 1.0 - CDF_POINTS / 100.0))
    for (sc, u), rs in groups.items():
        fig, (ax_cdf, ax_t) = plt.subplots(1, 2, figsize=(12, 4.2))
        policies = list(dict.fromkeys(r["policy"] for r in rs))
        colors = {p: f"C{i}" for i, p in enumerate(policies)}
        for r in rs:
            first = r["repeat"] == min(x["repeat"] for x in rs if x["policy"] == r["policy"])
            label = r["policy"] if first else None
            ax_cdf.plot(r["cdf_ms"], nines, color=colors[r["policy"]], label=label, lw=1.2)
            w = r["window_s"]
            ts = [(i + 0.5) * w for i, v in enumerate(r["p99_over_time_ms"]) if v is not None]
            vs = [v for v in r["p99_over_time_ms"] if v is not None]
            ax_t.plot(ts, vs, color=colors[r["policy"]], label=label, lw=1.2)
        ax_cdf.set_xscale("log")
        ax_cdf.set_yticks([0, 1, 2, 3, 4], ["0", "90", "99", "99.9", "99.99"])
        ax_cdf.set_xlabel("latency (ms, from intended send time)")
        ax_cdf.set_ylabel("percentile")
        ax_cdf.grid(True, which="both", alpha=0.3)
        ax_cdf.legend(fontsize=8)
        ax_cdf.set_title(f"{sc} at {u * 100:g}% load: latency CDF")
        ax_t.set_yscale("log")
        ax_t.set_xlabel("time (s)")
        ax_t.set_ylabel("p99 per window (ms)")
        ax_t.grid(True, alpha=0.3)
        scenario = SCENARIOS.get(sc)
        if scenario is not None:
            end = max(r["window_s"] * len(r["p99_over_time_ms"]) for r in rs)
            ax_t.axvspan(0, scenario.warmup_s, color="grey", alpha=0.15, lw=0)
            for bid, ev in scenario.events():
                ax_t.axvspan(ev.start_s, min(ev.end_s, end), color="red", alpha=0.08, lw=0)
                ax_t.annotate(f"{bid} {ev.kind}", (ev.start_s, 0.98), xycoords=("data", "axes fraction"),
                              fontsize=7, va="top", rotation=90)
        ax_t.set_title("p99 over time (grey: warm-up, red: events)")
        fig.tight_layout()
        path = out_dir / f"{sc}-u{u * 100:g}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def results_markdown(meta: dict[str, Any], table: str, plots: Sequence[Path],
                     extra: str | None = None) -> str:
    """The page bench/RESULTS.md: command, machine, tables, plots. Generated, not edited."""
    m = meta.get("machine", {})
    lines = [
        "# Foretell bench results",
        "",
        "Generated by the command below; do not edit by hand, run it again. The page itself",
        "is written by `foretell bench run ... --results-md bench/RESULTS.md`, or from a",
        "finished run by `foretell bench report OUT_DIR --results-md bench/RESULTS.md",
        "[--overhead-md FILE]` (FILE from `foretell bench overhead --out FILE`).",
        "",
        "```",
        meta.get("command", ""),
        "```",
        "",
        f"- started {meta.get('started', '?')}, finished {meta.get('finished', '?')}",
        f"- machine: {m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs, "
        f"{m.get('mem_gb', '?')} GB, Linux {m.get('kernel', '?')}, Python {m.get('python', '?')}",
        f"- repeats per cell: {meta.get('repeats')} (median shown); quick: {meta.get('quick')}; "
        f"seed {meta.get('seed')}; health: {meta.get('health', 'default')}",
        "- latency counted from the intended send time of an open-loop Poisson schedule; "
        "requests past the deadline count as errors at the deadline; warm-up excluded",
        "- the machine is shared and noisy: compare policies within this page, not across runs",
        "",
        table,
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{p.stem}]({p.as_posix()})" for p in plots]
    if extra:
        lines += ["", extra.replace("# Proxy overhead", "## Proxy overhead", 1)]
    return "\n".join(lines) + "\n"
