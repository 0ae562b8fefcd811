"""`foretell train ...`: offline training from the proxy's own telemetry.

    foretell train latency  --data DIR --out models/latency.onnx
    foretell train evaluate --model models/latency.onnx --data DIR
    foretell train forecast (--counts FILE | --data DIR) --out models/forecast.json

    foretell train anomaly  ...   (health engineer: train/anomaly.py)

Adding a command is one entry in `COMMANDS`: a function taking the rest of
the command line. The latency/evaluate/forecast commands are defined by
`add_<name>(sub)` functions. Heavy imports (scikit-learn, onnx) happen
inside the command.
Exit codes: 0 ok, 1 training refused or failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _load(args: argparse.Namespace, progress: Callable[[str], None]) -> Any:
    from train.dataset import load_telemetry

    progress(f"reading telemetry under {args.data}")
    data = load_telemetry(args.data, skip_other_schemas=args.skip_other_schemas)
    for line in data.report.lines():
        progress(line)
    return data


def _latency(args: argparse.Namespace) -> int:
    from train.dataset import DatasetError
    from train.latency import MAX_ROWS, Progress, TrainError, train_latency

    progress = Progress()
    try:
        data = _load(args, progress)
    except DatasetError as exc:
        print(f"foretell train latency: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = train_latency(
            data, Path(args.out), candidates=tuple(args.candidates.split(",")), target=args.target,
            validation_fraction=args.validation_fraction,
            max_rows=MAX_ROWS if args.max_rows is None else args.max_rows,
            max_inference_us=args.max_inference_us, force=args.force,
            seed=args.seed, progress=progress)
    except TrainError as exc:
        print(f"foretell train latency: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.report:
        Path(args.report).write_text(json.dumps({
            "metadata": result.metadata, "model": str(result.written)}, indent=2) + "\n")
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from policies.onnx_latency import ModelError
    from train.dataset import DatasetError
    from train.evaluate import EvaluateError, off_policy, onnx_predictor
    from train.latency import Progress

    progress = Progress(prefix="evaluate")
    try:
        predict, model = onnx_predictor(args.model)
    except ModelError as exc:
        print(f"foretell train evaluate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        data = _load(args, progress)
    except DatasetError as exc:
        print(f"foretell train evaluate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if model.route_classes and model.route_classes != data.route_classes:
        print(f"foretell train evaluate: the model was trained with route classes "
              f"{model.route_classes}, the telemetry has {data.route_classes}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        est = off_policy(data, predict, epsilon=args.epsilon,
                         failure_penalty_ms=args.failure_penalty_ms,
                         failure_cost_ms=args.failure_cost_ms)
    except EvaluateError as exc:
        print(f"foretell train evaluate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    progress(f"model {model.version} ({model.kind}) on {len(data.records)} logged records")
    for line in est.lines():
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(est.__dict__, indent=2) + "\n")
    return EXIT_OK


def _forecast(args: argparse.Namespace) -> int:
    from train.atomic import atomic_write
    from train.dataset import DatasetError
    from train.forecast import (
        ForecastTrainError,
        counts_from_telemetry,
        fit_forecast,
        read_counts,
    )
    from train.latency import Progress

    progress = Progress(prefix="forecast")
    try:
        if args.counts:
            counts = read_counts(args.counts, args.interval_s)
            gaps = int((~counts.follows[1:]).sum())
            progress(f"{len(counts.requests)} intervals of {args.interval_s:g} s from "
                     f"{counts.lines} lines of {args.counts}"
                     + (f"; {gaps} gap(s) in time, not fitted across" if gaps else ""))
        else:
            data = _load(args, progress)
            counts = counts_from_telemetry(data, args.interval_s)
            progress(f"{len(counts.requests)} intervals of {args.interval_s:g} s from telemetry "
                     "(sampled counts scaled by 1/sample_rate)")
        coef = fit_forecast(counts, args.interval_s, args.validation_fraction)
    except (OSError, DatasetError, ForecastTrainError) as exc:
        print(f"foretell train forecast: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    m = coef.metrics or {}
    progress(f"Load(t) = {coef.a:.3f} + {coef.b:.4f}*R(t-1) + {coef.c:.4f}*R(t-2); "
             f"validation MAE {m.get('validation_mae_requests', float('nan')):.2f} requests "
             f"(persistence {m.get('persistence_mae_requests', float('nan')):.2f})")
    if not m.get("validation_mae_requests", math.inf) < m.get("persistence_mae_requests", 0.0) \
            and not args.force:
        print("foretell train forecast: refusing to write: the fit is not better than the "
              "persistence forecast R(t) = R(t-1) on the validation intervals "
              "(pass --force to write it anyway)", file=sys.stderr)
        return EXIT_FAILED
    atomic_write(Path(args.out), (json.dumps(coef.to_json(), indent=2) + "\n").encode())
    progress(f"wrote {args.out}")
    return EXIT_OK


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="telemetry directory (*.ftel files)")
    p.add_argument("--skip-other-schemas", action="store_true",
                   help="skip files of another feature schema or route classes instead of failing")


def add_latency(sub: Any) -> None:
    p = sub.add_parser("latency", help="fit the latency model and export it to ONNX")
    _data_args(p)
    p.add_argument("--out", default="models/latency.onnx", help="model file (default: %(default)s)")
    p.add_argument("--candidates", default="ridge,mlp,hgb,hgb_l1",
                   help="comma-separated: ridge, mlp, hgb, hgb_l1 (gradient boosting fitted "
                        "for absolute error) (default: %(default)s)")
    p.add_argument("--target", choices=("auto", "ratio", "latency", "log_ratio", "log_latency"),
                   default="auto",
                   help="latency: learn ms; ratio: learn latency / route_cost_ms (scales "
                        "with queueing); log_*: the log of either (exp in the exported "
                        "graph); auto: all four, keep the best (default: %(default)s)")
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--max-rows", type=int, default=None,
                   help="train on the most recent N (default: train.latency.MAX_ROWS, 300,000)")
    p.add_argument("--max-inference-us", type=float, default=12.0,
                   help="skip candidates slower than this for 16 rows (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="write the model even if it is not better than the EWMA predictor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", help="also write the model's metadata as JSON here")
    p.set_defaults(func=_latency)


def add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="off-policy estimate of a model's latency on logged traffic")
    p.add_argument("--model", required=True, help="ONNX model to evaluate")
    _data_args(p)
    p.add_argument("--epsilon", type=float, default=0.0,
                   help="exploration the model would run with (default: %(default)s)")
    p.add_argument("--failure-penalty-ms", type=float, default=1000.0,
                   help="as the onnx_latency option (default: %(default)s)")
    p.add_argument("--failure-cost-ms", type=float, default=1000.0,
                   help="latency a failed attempt counts as, at least (default: %(default)s)")
    p.add_argument("--json", help="also write the estimates as JSON here")
    p.set_defaults(func=_evaluate)


def add_forecast(sub: Any) -> None:
    p = sub.add_parser("forecast", help="fit Load(t) = a + b*R(t-1) + c*R(t-2)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--counts", help="file of 'interval_end_s,requests' lines")
    src.add_argument("--data", help="telemetry directory (sampled; counts are scaled)")
    p.add_argument("--skip-other-schemas", action="store_true")
    p.add_argument("--interval-s", type=float, default=10.0,
                   help="interval length; must match forecast.interval_s (default: %(default)s)")
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--out", default="models/forecast.json")
    p.add_argument("--force", action="store_true",
                   help="write the coefficients even if they are not better than the "
                        "persistence forecast")
    p.set_defaults(func=_forecast)


def _anomaly(rest: list[str]) -> int:
    from train.anomaly import main as anomaly_main

    return anomaly_main(rest)


def _own(add: Callable[[Any], None]) -> Callable[[list[str]], int]:
    """A command defined by an `add_<name>(sub)` function, parsed on its own."""

    def run(rest: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="foretell train")
        sub = parser.add_subparsers(dest="command", required=True)
        add(sub)
        name = next(iter(sub.choices))
        args = parser.parse_args([name, *rest])
        return int(args.func(args))

    return run


# name -> (run(rest_of_argv) -> exit code, help). Each command parses its own arguments.
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "anomaly": (_anomaly, "fit the health anomaly model (Isolation Forest -> ONNX)"),
    "latency": (_own(add_latency), "fit the latency model and export it to ONNX"),
    "evaluate": (_own(add_evaluate), "off-policy estimate of a model's latency on logged traffic"),
    "forecast": (_own(add_forecast), "fit the load forecaster Load(t) = a + b*R(t-1) + c*R(t-2)"),
}


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="foretell train",
                                     description="Offline training from Foretell telemetry.")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(COMMANDS.items())))
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                        help="the command's own arguments (foretell train COMMAND --help)")
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    func, _ = COMMANDS[args.command]
    return func(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
