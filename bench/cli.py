"""`foretell bench ...`: run scenarios, measure proxy overhead.

Subcommands are registered in `build_parser`; each one's function takes the
parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_POLICIES = "round_robin,least_request,p2c_peak_ewma,hcl"


def _run(args: argparse.Namespace) -> int:
    from bench import report, runner, scenarios

    try:
        chosen = scenarios.select(args.scenario)
    except KeyError as exc:
        print(f"bench run: {exc.args[0]}", file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    try:
        policy_options = _policy_options(args.policy_options, policies)
    except ValueError as exc:
        print(f"bench run: {exc}", file=sys.stderr)
        return 2
    extra: dict[str, object] = {}
    if args.telemetry:
        extra["telemetry"] = {"enabled": True, "path": str(Path(args.telemetry).resolve()),
                              "sample_rate": args.telemetry_sample_rate}
    plans = runner.plan(chosen, policies, quick=args.quick, repeats=repeats, seed=args.seed,
                        health=args.health, policy_options=policy_options, extra_config=extra)
    from bench.variants import check_model_file

    try:
        checked = set()
        for plan in plans:  # each distinct (policy, options) once: a load runs the model
            key = (plan.policy, json.dumps(plan.policy_options, sort_keys=True, default=str))
            if key not in checked:
                checked.add(key)
                check_model_file(plan.policy, plan.policy_options, load=True)
    except ValueError as exc:
        print(f"bench run: {plan.scenario.name}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    est_s = sum(p.duration_s + 5.0 for p in plans)
    print(f"bench run: {len(plans)} runs ({len(chosen)} scenarios x {len(policies)} policies, "
          f"{repeats} repeat(s)), about {est_s / 60:.0f} min -> {out}", file=sys.stderr)
    command = "foretell bench " + " ".join(shlex.quote(a) for a in args.argv)
    meta = {"command": command, "machine": runner.machine_info(), "policies": policies,
            "scenarios": [s.name for s in chosen], "quick": args.quick, "repeats": repeats,
            "seed": args.seed, "health": args.health, "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # SIGTERM unwinds like Ctrl-C, so every fleet and proxy process is stopped by PID.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    results = runner.run_all(plans, out, progress,
                             partial=lambda rs: runner.write_results(rs, out, meta))
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    runner.write_results(results, out, meta)
    rows = report.aggregate(results)
    table = report.markdown_table(rows)
    (out / "results.md").write_text(f"# Bench results\n\n`{command}`\n\n{table}\n")
    plots = report.plot(results, out / "plots")
    print(table)
    if args.results_md:
        _write_results_md(Path(args.results_md), meta, table, plots, None)
    failed = sum(1 for r in results if "failed" in r)
    if failed:
        print(f"bench run: {failed} of {len(results)} runs failed (see {out}/raw/*.log)",
              file=sys.stderr)
    return 1 if failed else 0


def _policy_options(text: str | None, policies: list[str]) -> dict[str, Any]:
    """--policy-options parsed and checked against --policies (ValueError says what is wrong)."""
    from bench import variants

    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--policy-options: not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError("--policy-options: expected a JSON object of policy -> options")
    variants.check(policies, options)
    return options


def _write_results_md(md: Path, meta: dict[str, object], table: str, plots: list[Path],
                      extra: str | None) -> None:
    from bench import report

    plot_dir = md.parent / "results"
    plot_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in plots:
        shutil.copy(p, plot_dir / p.name)
        copied.append(Path("results") / p.name)
    md.write_text(report.results_markdown(meta, table, copied, extra))
    print(f"bench: wrote {md} and {len(copied)} plot(s) in {plot_dir}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    """Tables, plots and (optionally) bench/RESULTS.md again from a run's results.json."""
    import json

    from bench import report

    src = Path(args.source)
    data = json.loads((src / "results.json").read_text())
    rows = report.aggregate(data["runs"])
    table = report.markdown_table(rows)
    plots = report.plot(data["runs"], src / "plots")
    print(table)
    if args.results_md:
        extra = Path(args.overhead_md).read_text() if args.overhead_md else None
        _write_results_md(Path(args.results_md), data["meta"], table, plots, extra)
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _overhead(args: argparse.Namespace) -> int:
    from bench.overhead import OverheadError, run_overhead

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    from bench.variants import resolve

    try:  # before nginx and haproxy start
        options = resolve(policies, _policy_options(args.policy_options, policies), absolute=True)
    except ValueError as exc:
        print(f"bench overhead: {exc}", file=sys.stderr)
        return 2
    try:
        return run_overhead(policies, duration_s=args.duration_s, connections=args.connections,
                            repeats=args.repeats, policy_options=options,
                            out=Path(args.out) if args.out else None,
                            install=not args.no_install, references=not args.no_references)
    except OverheadError as exc:
        print(f"bench overhead: {exc}", file=sys.stderr)
        return 1


def _instructions(args: argparse.Namespace) -> int:
    from bench.instructions import main as instructions_main

    return instructions_main(["--policies", args.policies, "--requests", str(args.requests),
                              "--policy-options", args.policy_options])


def _memory(args: argparse.Namespace) -> int:
    from bench.memory import main as memory_main

    return memory_main(["--connections", str(args.connections), "--hold-s", str(args.hold_s)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foretell bench", description="Foretell benchmarks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run scenarios against policies, side by side")
    run.add_argument("--scenario", default="all", help="name or code, comma list, or 'all'")
    run.add_argument("--policies", default=DEFAULT_POLICIES,
                     help="comma list of policy kinds; KIND@LABEL runs KIND once more under that "
                          "name, with the --policy-options of KIND@LABEL on top of KIND's")
    run.add_argument("--quick", action="store_true",
                     help="one utilisation per scenario, short runs, one repeat")
    run.add_argument("--repeats", type=int, default=None, help="default: 3 (1 with --quick)")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--health", choices=("default", "shadow"), default="default",
                     help="shadow: passive detectors only detect, so policies are compared alone")
    run.add_argument("--out", default="bench-out", help="output directory")
    run.add_argument("--policy-options", default=None,
                     help='JSON: policy -> options, e.g. \'{"onnx_latency": {"model_path": '
                          '"models/{scenario}.onnx"}}\' ("{scenario}" in a string stands for each '
                          'scenario\'s name); only for policies in --policies')
    run.add_argument("--telemetry", default=None, metavar="DIR",
                     help="proxies record decision telemetry here (for foretell train); "
                          "{scenario} in it: one directory per scenario")
    run.add_argument("--telemetry-sample-rate", type=float, default=1.0)
    run.add_argument("--results-md", default=None,
                     help="also write this markdown page (e.g. bench/RESULTS.md) with plots")
    run.set_defaults(func=_run)

    rep = sub.add_parser("report", help="tables, plots and RESULTS.md from a run's results.json")
    rep.add_argument("source", help="the --out directory of a `bench run`")
    rep.add_argument("--results-md", default=None, help="write this page (e.g. bench/RESULTS.md)")
    rep.add_argument("--overhead-md", default=None,
                     help="append this `bench overhead --out` table to the page")
    rep.set_defaults(func=_report)

    ov = sub.add_parser("overhead", help="throughput and CPU per request vs nginx and haproxy (wrk)")
    ov.add_argument("--policies", default="round_robin,p2c_peak_ewma")
    ov.add_argument("--duration-s", type=float, default=10.0)
    ov.add_argument("--connections", type=int, default=32)
    ov.add_argument("--policy-options", default="{}", metavar="JSON",
                    help="options per policy kind (absolute paths: the proxy runs from a temp dir)")
    ov.add_argument("--repeats", type=int, default=3,
                    help="interleaved rounds; the table shows medians (default: %(default)s)")
    ov.add_argument("--out", default=None, help="write the table (markdown) here too")
    ov.add_argument("--no-install", action="store_true",
                    help="do not apt-get missing tools (fail instead)")
    ov.add_argument("--no-references", action="store_true",
                    help="run foretell's policies only (no direct, nginx, haproxy, minimal proxy): "
                         "shorter rounds, for comparing policies")
    ov.set_defaults(func=_overhead)

    ins = sub.add_parser("instructions", help="instructions per request under callgrind (noise-free)")
    ins.add_argument("--policies", default="round_robin,p2c_peak_ewma")
    ins.add_argument("--requests", type=int, default=2000)
    ins.add_argument("--policy-options", default="{}", metavar="JSON",
                     help="options per policy kind (JSON object keyed by kind; absolute paths)")
    ins.set_defaults(func=_instructions)

    mem = sub.add_parser("memory", help="proxy RSS at idle and with many keep-alive connections")
    mem.add_argument("--connections", type=int, default=1000)
    mem.add_argument("--hold-s", type=float, default=20.0)
    mem.set_defaults(func=_memory)

    from bench.health_bench import add_parser as add_health_parser
    from bench.mae_floor import add_parser as add_mae_floor_parser

    add_health_parser(sub)
    add_mae_floor_parser(sub)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
