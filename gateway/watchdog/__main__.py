"""`python -m gateway.watchdog`: the watchdog without the `mlx-gateway` console script."""

import sys

from gateway.watchdog.cli import main

sys.exit(main(sys.argv[1:]))
