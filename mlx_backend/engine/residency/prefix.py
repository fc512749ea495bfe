"""Prefix (KV) caches of finished requests, kept so that the next turn of a conversation skips the prefill of
what it shares with an earlier request: one `PromptStore` per loaded model, under one byte budget for all of
them. MLX thread only; `nbytes` may be read from the heartbeat thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from mlx_backend.engine.residency.prompt_store import PromptStore

_ENTRIES_PER_MODEL = 256
_async_eval: Callable[..., None] = mx.async_eval  # untyped in mlx


class PrefixCaches:
    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._by_model: dict[str, PromptStore] = {}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in list(self._by_model.values()))

    def drop(self, model_id: str) -> None:
        self._by_model.pop(model_id, None)

    def trim(self, n_bytes: int) -> None:
        """Free about `n_bytes` (the engine's memory budget needs them for weights or a running KV cache),
        the least recently saved entries first, model by model."""
        for cache in list(self._by_model.values()):
            if n_bytes <= 0:
                return
            before = cache.nbytes
            cache.trim_to(max(0, before - n_bytes))
            n_bytes -= before - cache.nbytes

    def fetch(self, model_id: str, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        """A copy of the longest cached prefix of `tokens` and the tokens still to feed (never none: an
        exact hit is stepped back by one token, since the model must be fed something)."""
        cache = self._by_model.get(model_id)
        return cache.fetch(tokens) if cache is not None else (None, tokens)

    def save(self, model_id: str, prompt_cache: list[Any] | None, tokens: list[int] | None) -> None:
        """Keep a finished request's KV cache, keyed by every token in it; trim the other models' caches
        first, then this one's, to stay within the budget."""
        if not prompt_cache or not tokens or self._budget <= 0:
            return
        # Detach it from the batch's arrays (else it holds the whole batch's cache): queued, not waited for,
        # since a wait here would idle the device while the next step is built (engine/batch_cache.py).
        _async_eval([c.state for c in prompt_cache])
        cache = self._by_model.get(model_id)
        if cache is None:
            cache = self._by_model[model_id] = PromptStore(_ENTRIES_PER_MODEL)
        cache.save(list(tokens), prompt_cache)
        over = self.nbytes - self._budget
        for other_id in sorted(self._by_model, key=lambda m: m == model_id):
            if over <= 0:
                break
            other = self._by_model[other_id]
            before = other.nbytes
            other.trim_to(max(0, before - over))
            over -= before - other.nbytes
