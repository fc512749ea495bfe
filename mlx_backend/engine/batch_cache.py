"""A batch's KV cache that rows join and leave without waiting for the device.

In continuous batching rows finish at different steps, so a row leaves the batch at most steps. mlx-lm 0.32.2's
`BatchKVCache.filter` (pinned) then reads the batch's left padding back from the device: it indexes the padding
(a new lazy array) and calls `tolist()` on it. That read is queued behind the step already in flight, so the
Python thread waits for the whole forward pass, and the device then idles while the next step's graph is built:
one bubble per leaving row. (A one-wave benchmark never sees it: all rows leave at once, at the end.)
`filter_without_waiting` reads the padding as it stands, which an earlier step already computed, and does the
rest on the host: the same keys, values, offsets and padding as mlx-lm's filter, with no wait.

Rows join through a prompt pass, and mlx-lm's `PromptProcessingBatch.prompt` waits for each pass (`mx.eval`)
and then empties MLX's buffer cache (`mx.clear_cache`), so the next steps allocate their buffers again. On a
GPU, `prompt_without_waiting` queues the pass that ends its prompts (every piece shorter than the prefill
pacer's piece: whole short prompts, a chat's new turn after its prefix-cache hit, a long prompt's tail): the
running rows' next step, which the new rows join (engine/joining.py), is built while it runs. A
pass of full pieces (a long prompt, paced: engine/pacing.py) stays mlx-lm's: waited for, so the pacer times
it, and followed by emptying the cache, so its large buffers go back. No backlog builds up: each row has one
last piece, and the next decode step waits for what was queued before it. On a CPU the engine keeps mlx-lm's
pass for every piece (pieces there take seconds).

`install(gpu=...)` puts both in place of mlx-lm's methods; the engine calls it once, when the batcher is made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
from mlx_lm.generate import PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache

__all__ = ["filter_without_waiting", "install", "pieces_of", "prompt_without_waiting"]

_MLX_LM_FILTER = BatchKVCache.filter
_MLX_LM_PROMPT = PromptProcessingBatch.prompt
_async_eval: Any = mx.async_eval  # untyped in mlx

QUEUED_PASS_MAX_TOKENS = 8192  # rows x the longest piece: a wider pass is waited for, and its buffers go back

_piece_tokens: int | None = None  # the prefill pacer's piece in the step being run (`pieces_of`)


def filter_without_waiting(cache: Any, batch_indices: list[int]) -> None:
    """Keep only the rows `batch_indices` of `cache` (a BatchKVCache), then drop the padding columns every kept
    row has on its left."""
    padding = cache.left_padding.tolist()  # in a decoding batch, computed by an earlier step: no wait
    kept = [padding[i] for i in batch_indices]
    shift = min(kept, default=0)
    if cache.keys is not None:
        keys, values = cache.keys[batch_indices], cache.values[batch_indices]
        if shift:
            keys, values = keys[..., shift:, :], values[..., shift:, :]
        cache.keys, cache.values = keys, values
    cache.offset = cache.offset[batch_indices]
    cache.left_padding = mx.array([p - shift for p in kept], dtype=cache.left_padding.dtype)
    cache._idx -= shift


@contextlib.contextmanager
def pieces_of(tokens: int) -> Iterator[None]:
    """The generation step run inside cuts prompts into pieces of `tokens` (the pacer's size, which the batcher
    gives mlx-lm's generator for the step): a piece shorter than that is its prompt's last."""
    global _piece_tokens
    _piece_tokens = tokens
    try:
        yield
    finally:
        _piece_tokens = None


def prompt_without_waiting(batch: Any, tokens: list[list[int]]) -> None:
    """Run one piece of each row's prompt (`tokens`, one list per row of `batch`, a PromptProcessingBatch) into
    the batch's caches, queued: the caches hold the result lazily. Shorter pieces are padded on the right, and
    the caches move that padding to the left, as for mlx-lm's pass. A pass with a full piece (more of its
    prompt to come) or wider than QUEUED_PASS_MAX_TOKENS is mlx-lm's."""
    if len(tokens) != len(batch.uids):
        raise ValueError(f"{len(tokens)} prompt pieces for a batch of {len(batch.uids)} rows")
    if not tokens:
        return
    longest = max(len(piece) for piece in tokens)
    piece_size = _piece_tokens or batch.prefill_step_size
    if longest >= piece_size or len(tokens) * longest > QUEUED_PASS_MAX_TOKENS:
        _MLX_LM_PROMPT(batch, tokens)
        return
    for held, piece in zip(batch.tokens, tokens, strict=True):
        held.extend(piece)  # the tokens each row's cache holds
    lengths = [len(piece) for piece in tokens]
    right = [longest - n for n in lengths]
    padded = any(right)
    if padded:
        for cache in batch.prompt_cache:
            cache.prepare(lengths=lengths, right_padding=right)
    inputs = mx.array([piece + [0] * pad for piece, pad in zip(tokens, right, strict=True)])
    for start in range(0, longest, batch.prefill_step_size):
        batch.model(inputs[:, start:start + batch.prefill_step_size], cache=batch.prompt_cache)
    if padded:
        for cache in batch.prompt_cache:
            cache.finalize()
    _async_eval([c.state for c in batch.prompt_cache])


def install(gpu: bool) -> None:
    """Rows leave every BatchKVCache without waiting; on a GPU (`gpu`) they also join without waiting for their
    prompt pass (idempotent)."""
    BatchKVCache.filter = filter_without_waiting  # type: ignore[method-assign]
    prompt: Any = prompt_without_waiting if gpu else _MLX_LM_PROMPT
    PromptProcessingBatch.prompt = prompt  # type: ignore[method-assign]


def uninstall() -> None:
    """mlx-lm's own filter and prompt pass back (benchmarks compare them)."""
    BatchKVCache.filter = _MLX_LM_FILTER  # type: ignore[method-assign]
    PromptProcessingBatch.prompt = _MLX_LM_PROMPT  # type: ignore[method-assign]
