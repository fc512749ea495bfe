"""Test-only faults that stand for native failures, honoured only with EngineConfig.allow_fault_injection
(the gateway's --test-faults): requests carry them in Generate.fault.

- "abort": the engine process aborts (SIGABRT), as a Metal/CUDA allocation failure does;
- "stall": the MLX thread blocks for good, as a native deadlock inside mx.eval does;
- "raise": an exception while decoding the request (it alone fails);
- "slow": the whole batch is paced at ~20 steps/s, so tests can act mid-stream.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("mlx_gateway.engine.faults")

SLOW_STEP_S = 0.05


def before_start(fault: str | None) -> None:
    if fault == "abort":
        log.error("fault injection: aborting the engine process")
        os.abort()
    if fault == "stall":
        log.error("fault injection: the MLX thread stalls for good")
        threading.Event().wait()


def while_decoding(fault: str | None) -> None:
    if fault == "raise":
        raise RuntimeError("injected fault (raise)")


def pace(step_started: float) -> None:
    time.sleep(max(0.0, SLOW_STEP_S - (time.monotonic() - step_started)))
