"""`python -m proxy --config FILE` is `foretell serve --config FILE`."""

import sys

from proxy.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
