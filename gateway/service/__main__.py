"""`python -m gateway.service`: the service commands without the `mlx-gateway` console script."""

import sys

from gateway.service.cli import main

sys.exit(main(sys.argv[1:]))
