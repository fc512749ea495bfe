"""Test-only faults that stand for native failures, honoured only with EngineConfig.allow_fault_injection
(the gateway's --test-faults): requests carry them in Generate.fault.

- "abort": the engine process aborts (SIGABRT), as a Metal/CUDA allocation failure does;
- "stall": the MLX thread blocks for good, as a native deadlock inside mx.eval does;
- "raise": an exception while decoding the request (it alone fails);
- "slow": the whole batch is paced at ~20 steps/s, so tests can act mid-stream;
- "stall-rank-1": as "stall", on rank 1 of an engine group only (rank 0 then waits for it in a collective);
- "emit:TEXT": the model's sampling is held to TEXT's tokens (special tokens included), then runs free: a
  random test model then writes a family's real markup (reasoning blocks, calls), through the whole engine.
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
    if fault == "stall" or (fault == "stall-rank-1" and os.environ.get("MLX_RANK") == "1"):
        log.error("fault injection: the MLX thread stalls for good")
        threading.Event().wait()


def while_decoding(fault: str | None) -> None:
    if fault == "raise":
        raise RuntimeError("injected fault (raise)")


def emitted_text(fault: str | None) -> str | None:
    return fault.removeprefix("emit:") if fault is not None and fault.startswith("emit:") else None


def pace(step_started: float) -> None:
    time.sleep(max(0.0, SLOW_STEP_S - (time.monotonic() - step_started)))
