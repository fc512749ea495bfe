"""Rows leave a batch's KV cache without a device wait (mlx_backend/engine/batch_cache.py): the filter keeps exactly
what mlx-lm's own filter keeps, for any rows and paddings, and a batch whose rows finish at different steps
generates the same tokens with either filter."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache

from mlx_backend.engine import batch_cache
from tests.support import tiny_models as tm


@pytest.fixture(autouse=True)
def _restore_filter() -> Iterator[None]:
    installed = BatchKVCache.filter
    yield
    BatchKVCache.filter = installed


def cache_with(left_padding: list[int], length: int, seed: int) -> BatchKVCache:
    """A BatchKVCache of len(left_padding) rows, `length` columns written, random keys and values."""
    cache = BatchKVCache(left_padding)
    mx.random.seed(seed)
    keys = mx.random.normal((len(left_padding), 2, length, 4))
    cache.update_and_fetch(keys, keys + 1)
    return cache


def state(cache: BatchKVCache) -> list[Any]:
    keys, values = cache.keys_and_values()
    return [keys.tolist(), values.tolist(), cache.offset.tolist(), cache.left_padding.tolist(), cache._idx]


@pytest.mark.parametrize("left_padding, keep", [
    ([0, 3, 5], [1, 2]),  # the row without padding leaves: two columns of padding go
    ([4, 3, 5, 2], [0, 2]),
    ([0, 0, 1], [0, 1, 2]),  # nobody leaves
    ([2, 2, 2], [1]),
    ([0, 6, 1, 3], [3, 1]),  # out of order
])
def test_the_filter_keeps_what_mlx_lm_keeps(left_padding: list[int], keep: list[int]) -> None:
    ours, theirs = cache_with(left_padding, 9, seed=1), cache_with(left_padding, 9, seed=1)
    batch_cache.filter_without_waiting(ours, keep)
    batch_cache._MLX_LM_FILTER(theirs, keep)
    assert state(ours) == state(theirs)


def test_random_paddings_and_rows_agree_with_mlx_lm() -> None:
    rng = random.Random(7)
    for trial in range(50):
        rows = rng.randint(1, 6)
        padding = [rng.randint(0, 5) for _ in range(rows)]
        keep = sorted(rng.sample(range(rows), rng.randint(1, rows)))
        ours, theirs = cache_with(padding, 8, seed=trial), cache_with(padding, 8, seed=trial)
        batch_cache.filter_without_waiting(ours, keep)
        batch_cache._MLX_LM_FILTER(theirs, keep)
        assert state(ours) == state(theirs), (padding, keep)


def test_an_empty_cache_filters_its_offsets_and_padding() -> None:
    ours, theirs = BatchKVCache([1, 0, 2]), BatchKVCache([1, 0, 2])
    batch_cache.filter_without_waiting(ours, [0, 2])
    batch_cache._MLX_LM_FILTER(theirs, [0, 2])
    assert (ours.offset.tolist(), ours.left_padding.tolist(), ours._idx) == \
        (theirs.offset.tolist(), theirs.left_padding.tolist(), theirs._idx)


def test_install_replaces_mlx_lms_filter_and_uninstall_brings_it_back() -> None:
    batch_cache.install()
    assert BatchKVCache.filter is batch_cache.filter_without_waiting
    batch_cache.uninstall()
    assert BatchKVCache.filter is batch_cache._MLX_LM_FILTER


def staggered_tokens(model: Any) -> dict[int, list[int]]:
    """Greedy tokens of rows that join at different steps and finish at different steps (every finish filters)."""
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=8, prefill_batch_size=2)
    prompts = [[5 + i] * (3 + 2 * i) for i in range(6)]
    out: dict[int, list[int]] = {}
    waiting = list(enumerate(prompts))
    while waiting or generator._generation_batch.uids or generator._unprocessed_sequences:
        if waiting:
            i, prompt = waiting.pop(0)
            (uid,) = generator.insert([prompt], max_tokens=[4 + 3 * i])
            out[uid] = []
        _, responses = generator.next()
        for r in responses:
            out[r.uid].append(r.token)
    generator.close()
    return out


def test_a_batch_whose_rows_come_and_go_generates_the_same_tokens(tmp_path: Path) -> None:
    model, _ = load(str(tm.make_tiny_model(tmp_path / "tiny", dtype="float32")))
    batch_cache.uninstall()
    expected = staggered_tokens(model)
    batch_cache.install()
    assert staggered_tokens(model) == expected
    assert [len(t) for t in expected.values()] == [4 + 3 * i for i in range(6)]
