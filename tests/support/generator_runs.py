"""A BatchGenerator driven the way the engine drives it, one arrival of prompts a step, for tests that compare
mlx-lm's own generator with ours (tests/unit/mlx_backend/engine/test_joining.py, test_batch_cache.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from mlx_backend.engine import joining
from mlx_backend.engine.logprobs import RowOf

Arrival = tuple[list[list[int]], list[int]]  # prompts inserted at one step, and their max_tokens

# one arrival a step, each its own length; then pairs of prompts of different lengths
STAGGERED: list[Arrival] = [([[5 + i] * (3 + 2 * i)], [4 + 3 * i]) for i in range(6)]
PAIRED: list[Arrival] = [([[7 + i] * (2 + 5 * i), [9 + i] * (3 + 3 * i)], [6 + 2 * i, 9 - i]) for i in range(3)]


@dataclass
class Run:
    """What a generator answered, per uid, and the forward passes it took."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[float]] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    finals: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)  # all_tokens, cache lengths
    passes: list[tuple[int, int]] = field(default_factory=list)  # (rows, tokens per row) of each model call


Extras = Callable[[list[list[int]]], dict[str, Any]]  # an arrival's prompts -> more insert() arguments


def run(model: Any, arrivals: list[Arrival], join: bool, remove: dict[int, int] | None = None,
        extras: Extras | None = None, **options: Any) -> Run:
    """Insert one arrival per step (with `extras(prompts)`), then step until every row is done; `remove`
    {step: uid} removes a row then."""
    result = Run()
    model_class = type(model)
    forward = model_class.__call__

    def counted(self: Any, inputs: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        result.passes.append((inputs.shape[0], inputs.shape[1]))
        return forward(self, inputs, *args, **kwargs)

    model_class.__call__ = counted
    generator: Any = BatchGenerator(model, stop_tokens=options.pop("stop_tokens", []), **options)
    if join:
        joining.join_in_step(generator)
    pending = list(arrivals)
    step = 0
    try:
        while pending or generator._generation_batch.uids or generator._unprocessed_sequences or \
                generator._prompt_batch.uids:
            if pending:
                prompts, max_tokens = pending.pop(0)
                for uid in generator.insert(prompts, max_tokens=max_tokens, **(extras(prompts) if extras else {})):
                    result.tokens[uid], result.logprobs[uid] = [], []
            if remove and step in remove:
                generator.remove([remove[step]])
            for response in generator.next()[1]:
                result.tokens[response.uid].append(response.token)
                row = response.logprobs  # the engine's batch hands a RowOf its step's logprobs, mlx-lm's an array
                row = row.row() if isinstance(row, RowOf) else row
                result.logprobs[response.uid].append(row[response.token].item())
                if response.finish_reason is not None:
                    result.reasons[response.uid] = response.finish_reason
                    result.finals[response.uid] = (list(response.all_tokens),
                                                   [c.size() for c in response.prompt_cache])
            step += 1
    finally:
        generator.close()
        model_class.__call__ = forward
    return result
