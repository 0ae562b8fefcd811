"""`foretell train ...`: offline training commands.

Each sub-command's module owns its own arguments; this only dispatches.
(Created by the health engineer with the `anomaly` command; the learning
engineer owns this file and adds the latency-model commands.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _anomaly(rest: list[str]) -> int:
    from train.anomaly import main

    return main(rest)


COMMANDS = {
    "anomaly": (_anomaly, "fit the health anomaly model (Isolation Forest -> ONNX)"),
}


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="foretell train", description="Offline training.")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(COMMANDS.items())))
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    func, _ = COMMANDS[args.command]
    return func(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
