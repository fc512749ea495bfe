"""The gateway's commands handed to the batcher on the MLX thread, the same whether the engine runs alone
(worker.py) or as a group (rank.py: every rank hands rank 0's commands over in the same order)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from mlx_backend.contract import (
    Abort,
    Command,
    CountPrompt,
    Event,
    Failed,
    Generate,
    ModelControl,
    ModelControlDone,
    PromptCount,
    Shutdown,
)
from mlx_backend.errors import EngineError, EngineErrorCode

if TYPE_CHECKING:
    from mlx_backend.control import Controls
    from mlx_backend.engine.batcher import Batcher

log = logging.getLogger("mlx_gateway.engine")


def apply_command(
    batcher: Batcher,
    command: Command,
    send: Callable[[Event], None],
    *,
    controls: Controls | None = None,
    counts: list[Generate] | None = None,
) -> bool:
    """Hand one command to the batcher (MLX thread); False once it was Shutdown (the batcher is then empty).

    `controls` answers the admin API (a single engine: an engine group's ranks would have to agree on each
    such decision, which they do not yet); `counts` keeps the prompt counts that wait for their model's load,
    answered after each step; without it a count is answered at once."""
    if isinstance(command, Shutdown):
        log.info("shutdown requested: ending %d requests and freeing the models", batcher.running + batcher.waiting)
        batcher.shutdown()
        return False
    if isinstance(command, Generate):
        batcher.submit(command)
    elif isinstance(command, Abort):
        batcher.abort(command.request_id)
    elif isinstance(command, ModelControl):
        if controls is not None:
            controls.handle(command)
        else:
            send(ModelControlDone(command.request_id, EngineErrorCode.INVALID_REQUEST.value,
                                  "Loading, unloading and pinning models is not available for an engine group."))
    elif isinstance(command, CountPrompt):
        if counts is not None:
            counts.append(command.request)
        else:
            send(count_prompt(batcher, command.request) or Failed(
                command.request.request_id, EngineErrorCode.ENGINE_OVERLOADED.value,
                "The model is loading; count the prompt again shortly."))
    return True


def count_prompt(batcher: Batcher, command: Generate) -> PromptCount | Failed | None:
    """The prompt `command` would run with, counted, on the MLX thread (which owns the model cache); None
    while its model loads (the load is asked for, as a request would, and happens between decode steps)."""
    from mlx_backend.engine import vision
    from mlx_backend.engine.tools import prompt_tokens

    rid = command.request_id
    try:
        cached = batcher.cache.acquire(command.model, batcher.busy_models(), waiter=rid)
        if cached is None:
            return None
        vision.refuse_images(command, cached.entry, sees=vision.takes_images(cached))
        if vision.takes_images(cached):  # its images' tokens counted too
            return PromptCount(rid, len(vision.prompt_of(command, cached)[0]))
        return PromptCount(rid, len(prompt_tokens(command, cached.artifacts.tokenizer)))
    except EngineError as exc:
        return Failed(rid, exc.code.value, exc.message, exc.param)
    except Exception as exc:
        log.exception("counting the prompt of %s failed", rid)
        return Failed(rid, EngineErrorCode.INTERNAL.value, f"Counting the prompt failed: {type(exc).__name__}")
