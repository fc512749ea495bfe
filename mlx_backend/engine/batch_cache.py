"""A batch's KV cache that lets rows leave without waiting for the device.

In continuous batching rows finish at different steps, so a row leaves the batch at most steps. mlx-lm 0.32.2's
`BatchKVCache.filter` (pinned) then reads the batch's left padding back from the device: it indexes the padding
(a new lazy array) and calls `tolist()` on it. That read is queued behind the step already in flight, so the
Python thread waits for the whole forward pass, and the device then idles while the next step's graph is built:
one bubble per leaving row. (A one-wave benchmark never sees it: all rows leave at once, at the end.)

`filter_without_waiting` reads the padding as it stands, which an earlier step already computed, and does the
rest on the host: the same keys, values, offsets and padding as mlx-lm's filter, with no wait. `install()` puts
it in place of mlx-lm's method; the engine calls it once, when the batcher is made.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

__all__ = ["filter_without_waiting", "install"]

_MLX_LM_FILTER = BatchKVCache.filter


def filter_without_waiting(cache: Any, batch_indices: list[int]) -> None:
    """Keep only the rows `batch_indices` of `cache` (a BatchKVCache), then drop the padding columns every kept
    row has on its left."""
    padding = cache.left_padding.tolist()  # computed by an earlier step: nothing to wait for
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


def install() -> None:
    """Make every BatchKVCache filter without waiting (idempotent)."""
    BatchKVCache.filter = filter_without_waiting  # type: ignore[method-assign]


def uninstall() -> None:
    """mlx-lm's own filter back (benchmarks compare the two)."""
    BatchKVCache.filter = _MLX_LM_FILTER  # type: ignore[method-assign]
