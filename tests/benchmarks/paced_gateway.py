"""`mlx-gateway serve` with the paced stand-in engine (tests/support/paced_worker.py) in place of MLX: the
whole HTTP path (Granian, Litestar, the exchange, the engine client and IPC) with an engine whose speed and
CPU use are set by PACED_* environment variables. Arguments are `mlx-gateway serve`'s.

    PACED_STEP_MS=2 python tests/benchmarks/paced_gateway.py --port 8123 --trace-tokens /tmp/trace
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway import serve
from gateway.settings import parse_settings
from mlx_backend.client.engine import EngineClient

if __name__ == "__main__":
    serve.EngineClient = functools.partial(  # type: ignore[misc]
        EngineClient, worker_module="tests.support.paced_worker"
    )
    sys.exit(serve.run(parse_settings(sys.argv[1:])))
