"""Test-only faults that stand for native failures, honoured only with EngineConfig.allow_fault_injection
(the gateway's --test-faults): requests carry them in Generate.fault.

- "abort": the engine process aborts (SIGABRT), as a Metal/CUDA allocation failure does;
- "stall": the MLX thread blocks for good, as a native deadlock inside mx.eval does;
- "raise": an exception while decoding the request (it alone fails);
- "slow": the whole batch is paced at ~20 steps/s, so tests can act mid-stream;
- "stall-rank-1": as "stall", on rank 1 of an engine group only (rank 0 then waits for it in a collective);
- "say:TEXT": every choice's sampler spells TEXT (encoded by the model's own tokenizer), then the end-of-turn
  token, whatever the model's logits say. Everything after the choice of token is real: the detokenizer, the
  tool-call parser, stops, the wire. It lets tests drive real clients (coding agents) through a tool round
  trip on a random model, which would never decide to call a tool (gateway/test_script.py picks the text).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import mlx.core as mx

log = logging.getLogger("mlx_gateway.engine.faults")

SLOW_STEP_S = 0.05
SAY_PREFIX = "say:"


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


def pace(step_started: float) -> None:
    time.sleep(max(0.0, SLOW_STEP_S - (time.monotonic() - step_started)))


def scripted_tokens(fault: str | None, tokenizer: Any) -> list[int] | None:
    """The tokens a "say:TEXT" fault makes a choice produce: TEXT, then the end of the turn."""
    if fault is None or not fault.startswith(SAY_PREFIX):
        return None
    text = fault[len(SAY_PREFIX):]
    return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]


class ScriptedSampler:
    """A sampler that ignores the distribution and hands out the script's tokens one per call (the end token
    again once the script is spent: the choice has ended by then)."""

    def __init__(self, tokens: list[int]) -> None:
        self._tokens = tokens
        self._next = 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        token = self._tokens[min(self._next, len(self._tokens) - 1)]
        self._next += 1
        return mx.array([token] * logprobs.shape[0], dtype=mx.uint32)
