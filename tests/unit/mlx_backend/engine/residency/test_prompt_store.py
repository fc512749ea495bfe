"""PromptStore: a saved KV cache is found by the longest prefix it shares with a new prompt."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlx_backend.engine.residency.prompt_store import PromptStore, shared_prefix


def kv_cache(tokens: list[int], layers: int = 2) -> list[Any]:
    """A KV cache whose entry at position i holds token i's id, so a cut is visible in its contents."""
    caches = []
    for _ in range(layers):
        cache = KVCache()
        values = mx.array(tokens, dtype=mx.float32).reshape(1, 1, len(tokens), 1)
        cache.update_and_fetch(values, values)
        caches.append(cache)
    return caches


def held_tokens(prompt_cache: list[Any]) -> list[int]:
    cache = prompt_cache[0]
    return [int(x) for x in cache.keys[..., : cache.offset, :].reshape(-1).tolist()]


def test_shared_prefix_counts_leading_equal_tokens() -> None:
    import numpy as np

    assert shared_prefix(np.array([1, 2, 3]), np.array([1, 2, 4, 5])) == 2
    assert shared_prefix(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert shared_prefix(np.array([9]), np.array([1])) == 0
    assert shared_prefix(np.array([], dtype=int), np.array([1])) == 0


def test_an_empty_store_finds_nothing() -> None:
    assert PromptStore(8).fetch([1, 2, 3]) == (None, [1, 2, 3])


def test_a_saved_prefix_of_the_prompt_is_used_whole() -> None:
    store = PromptStore(8)
    store.save([1, 2, 3], kv_cache([1, 2, 3]))
    cache, rest = store.fetch([1, 2, 3, 4, 5])
    assert cache is not None and held_tokens(cache) == [1, 2, 3]
    assert rest == [4, 5]


def test_a_longer_saved_sequence_is_cut_back_to_the_shared_part() -> None:
    # Another conversation on the same system prompt: its cache, trimmed to what both share.
    store = PromptStore(8)
    store.save([1, 2, 3, 7, 8], kv_cache([1, 2, 3, 7, 8]))
    cache, rest = store.fetch([1, 2, 3, 4])
    assert cache is not None and held_tokens(cache) == [1, 2, 3]
    assert rest == [4]


def test_an_exact_hit_leaves_one_token_to_feed() -> None:
    store = PromptStore(8)
    store.save([1, 2, 3], kv_cache([1, 2, 3]))
    cache, rest = store.fetch([1, 2, 3])
    assert cache is not None and held_tokens(cache) == [1, 2]
    assert rest == [3]


def test_the_saved_cache_is_not_changed_by_a_fetch() -> None:
    store = PromptStore(8)
    store.save([1, 2, 3, 7], kv_cache([1, 2, 3, 7]))
    store.fetch([1, 2, 9])
    cache, rest = store.fetch([1, 2, 3, 7, 8])
    assert cache is not None and held_tokens(cache) == [1, 2, 3, 7] and rest == [8]


def test_the_longest_usable_prefix_wins_and_ties_go_to_the_shorter_cache() -> None:
    store = PromptStore(8)
    store.save([1, 2], kv_cache([1, 2]))
    store.save([5, 6, 7], kv_cache([5, 6, 7]))
    store.save([1, 2, 3, 4, 9, 9], kv_cache([1, 2, 3, 4, 9, 9]))
    store.save([1, 2, 3, 4, 8], kv_cache([1, 2, 3, 4, 8]))
    cache, rest = store.fetch([1, 2, 3, 4, 5])
    assert cache is not None and held_tokens(cache) == [1, 2, 3, 4] and rest == [5]


def test_a_cache_that_cannot_be_trimmed_is_used_only_as_a_prefix() -> None:
    store = PromptStore(8)
    rotating = RotatingKVCache(max_size=4, keep=0)
    values = mx.zeros((1, 1, 6, 1))
    rotating.update_and_fetch(values, values)  # wrapped around: no longer trimmable
    store.save([1, 2, 3, 4, 5, 6], [rotating])
    assert store.fetch([1, 2, 3, 9]) == (None, [1, 2, 3, 9])


def test_saving_a_longer_sequence_drops_its_saved_prefixes() -> None:
    store = PromptStore(8)
    store.save([1, 2], kv_cache([1, 2]))
    store.save([1, 2, 3], kv_cache([1, 2, 3]))
    store.save([1, 2, 3], kv_cache([1, 2, 3]))  # the same tokens again: replaced, not kept twice
    store.save([4, 5], kv_cache([4, 5]))
    assert len(store) == 2
    assert store.nbytes == sum(c.nbytes for c in kv_cache([1, 2, 3])) + sum(c.nbytes for c in kv_cache([4, 5]))


def test_the_least_recently_used_entry_goes_first() -> None:
    store = PromptStore(2)
    store.save([1, 1], kv_cache([1, 1]))
    store.save([2, 2], kv_cache([2, 2]))
    store.fetch([1, 1, 5])  # [1, 1] is now the most recently used
    store.save([3, 3], kv_cache([3, 3]))
    assert store.fetch([2, 2, 5]) == (None, [2, 2, 5])
    assert store.fetch([1, 1, 5])[1] == [5]


def test_trim_to_keeps_at_most_the_bytes_asked() -> None:
    store = PromptStore(8)
    for first in range(4):
        store.save([first, 1, 2, 3], kv_cache([first, 1, 2, 3]))
    one = store.nbytes // 4
    store.trim_to(2 * one)
    assert len(store) == 2 and store.nbytes == 2 * one
    assert store.fetch([0, 1, 2, 3, 4])[0] is None  # the oldest went
    store.trim_to(0)
    assert len(store) == 0 and store.nbytes == 0


def test_among_many_sequences_on_one_long_system_prompt_the_shared_part_is_found() -> None:
    # The case mlx-lm's trie was slow on (every conversation of an agent shares its system prompt).
    store = PromptStore(256)
    system = list(range(2000))
    for i in range(256):
        saved = [*system, 10_000 + i, 20_000 + i]
        store.save(saved, kv_cache(saved, layers=1))
    cache, rest = store.fetch([*system, 30_000])
    assert cache is not None and held_tokens(cache) == system and rest == [30_000]
    cache, rest = store.fetch([*system, 10_007, 20_007, 5])
    assert cache is not None and held_tokens(cache)[-2:] == [10_007, 20_007] and rest == [5]
