"""The `foretell` command: serve, check-config, demo, and the bench/train groups.

Heavy imports happen inside each subcommand so `foretell --help` is instant
and so `serve` can set up multiprocess metrics before prometheus_client loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_CONFIG = 2


def _serve(args: argparse.Namespace) -> int:
    from proxy.main import serve

    return serve(args.config)


def _check_config(args: argparse.Namespace) -> int:
    import yaml

    from proxy.config import ConfigError
    from proxy.loader import load

    try:
        loaded = load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(f"# {args.config}: valid", file=sys.stderr)
    print(yaml.safe_dump(loaded.config.model_dump(mode="json"), sort_keys=False), end="")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(args.config, duration_s=args.duration_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foretell",
        description="Foretell: an HTTP load balancer that routes by predicted latency.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", "-c", default="config.yaml", help="config file (default: %(default)s)")
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config and print the effective one")
    check.add_argument("config", nargs="?", default="config.yaml",
                       help="config file (default: %(default)s)")
    check.set_defaults(func=_check_config)

    demo = sub.add_parser("demo", help="start a simulated backend fleet and the proxy in front of it")
    demo.add_argument("--config", "-c", default="config.yaml",
                      help="config file; the fleet takes its backend ports (default: %(default)s)")
    demo.add_argument("--duration-s", type=float, default=None,
                      help="stop by itself after this many seconds (default: run until Ctrl-C)")
    demo.set_defaults(func=_demo)

    # Groups with their own sub-commands take the rest of the command line.
    sub.add_parser("bench", help="benchmarks: see `foretell bench --help`", add_help=False)
    sub.add_parser("train", help="offline training: see `foretell train --help`", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from bench.cli import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "train":
        from train.cli import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
