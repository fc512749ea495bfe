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
    Embed,
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
    from mlx_backend.engine.batcher import Batcher
    from mlx_backend.engine.control import Controls
    from mlx_backend.engine.embeddings import EmbedRequests
    from mlx_backend.engine.residency.load_queue import LoadOutcome

log = logging.getLogger("mlx_gateway.engine")


def apply_command(
    batcher: Batcher,
    command: Command,
    send: Callable[[Event], None],
    *,
    controls: Controls | None = None,
    embeds: EmbedRequests | None = None,
) -> bool:
    """Hand one command to the batcher (MLX thread); False once it was Shutdown (the batcher is then empty).

    `controls` answers the admin API, and with it a prompt count waits for its model's load (a single engine:
    an engine group's ranks would have to agree on each such decision, which they do not yet); without it a
    count is answered at once. `embeds` takes the embedding requests (a single engine: a group refuses them)."""
    if isinstance(command, Shutdown):
        log.info("shutdown requested: ending %d requests and freeing the models", batcher.running + batcher.waiting)
        batcher.shutdown()
        return False
    if isinstance(command, Generate):
        batcher.submit(command)
    elif isinstance(command, Abort):
        if embeds is None or not embeds.abort(command.request_id):
            batcher.abort(command.request_id)
    elif isinstance(command, Embed):
        if embeds is not None:
            embeds.submit(command)
        else:
            send(Failed(command.request_id, EngineErrorCode.INVALID_REQUEST.value,
                        "Embeddings are not available from an engine group.", "model"))
    elif isinstance(command, ModelControl):
        if controls is not None:
            controls.handle(command)
        else:
            send(ModelControlDone(command.request_id, EngineErrorCode.INVALID_REQUEST.value,
                                  "Loading, unloading and pinning models is not available for an engine group."))
    elif isinstance(command, CountPrompt):
        count_prompt(batcher, command.request, send, wait=controls is not None)
    return True


def count_prompt(batcher: Batcher, command: Generate, send: Callable[[Event], None], *, wait: bool) -> None:
    """Count the prompt `command` would run with, on the MLX thread (which owns the models). The count waits
    for its model like a request (its load is asked for and happens between decode steps) and is sent when the
    outcome comes; without `wait` it is answered at once, ENGINE_OVERLOADED while the model loads."""
    from mlx_backend.engine.residency.load_queue import Waiter

    rid = command.request_id
    outcomes: list[LoadOutcome] = []

    def deliver(outcome: LoadOutcome) -> None:
        if wait:
            send(_counted(command, outcome))
        else:
            outcomes.append(outcome)

    batcher.residency.wait_for(command.model, Waiter(rid, "count", deliver), batcher.busy_models())
    if wait:
        return
    if outcomes:
        send(_counted(command, outcomes[0]))
        return
    batcher.residency.forget_waiter(rid)
    send(Failed(rid, EngineErrorCode.ENGINE_OVERLOADED.value, "The model is loading; count the prompt again shortly."))


def _counted(command: Generate, outcome: LoadOutcome) -> PromptCount | Failed:
    from mlx_backend.engine import vision
    from mlx_backend.engine.tools import prompt_tokens

    rid = command.request_id
    if outcome.error is not None:
        return Failed(rid, outcome.error.code.value, outcome.error.message, outcome.error.param)
    assert outcome.model is not None
    try:
        cached = outcome.model
        vision.refuse_images(command, cached.entry, sees=vision.takes_images(cached))
        if vision.takes_images(cached):  # its images' tokens counted too
            return PromptCount(rid, len(vision.prompt_of(command, cached)[0]))
        return PromptCount(rid, len(prompt_tokens(command, cached.artifacts.tokenizer)))
    except EngineError as exc:
        return Failed(rid, exc.code.value, exc.message, exc.param)
    except Exception as exc:
        log.exception("counting the prompt of %s failed", rid)
        return Failed(rid, EngineErrorCode.INTERNAL.value, f"Counting the prompt failed: {type(exc).__name__}")
