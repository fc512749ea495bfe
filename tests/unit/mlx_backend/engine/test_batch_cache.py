"""Rows join and leave a batch's KV cache without a device wait (mlx_backend/engine/batch_cache.py): the filter
keeps exactly what mlx-lm's own filter keeps, for any rows and paddings; the queued prompt pass leaves the caches
as mlx-lm's pass does, padded or not; and a batch whose rows join and finish at different steps generates the
same tokens either way."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from mlx_backend.engine import batch_cache
from tests.support import tiny_models as tm
from tests.support.generator_runs import PAIRED, STAGGERED, run


@pytest.fixture(autouse=True)
def _restore_methods() -> Iterator[None]:
    installed = BatchKVCache.filter, PromptProcessingBatch.prompt
    yield
    BatchKVCache.filter, PromptProcessingBatch.prompt = installed  # type: ignore[method-assign]


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


def test_install_replaces_the_filter_everywhere_and_the_prompt_pass_on_a_gpu_only() -> None:
    batch_cache.install(gpu=False)
    assert BatchKVCache.filter is batch_cache.filter_without_waiting
    assert PromptProcessingBatch.prompt is batch_cache._MLX_LM_PROMPT  # a CPU's pieces are waited for and timed
    batch_cache.install(gpu=True)
    assert PromptProcessingBatch.prompt is batch_cache.prompt_without_waiting
    batch_cache.uninstall()
    assert BatchKVCache.filter is batch_cache._MLX_LM_FILTER
    assert PromptProcessingBatch.prompt is batch_cache._MLX_LM_PROMPT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model, _ = load(str(tm.make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", dtype="float32")))
    return model


def prompt_batch(model: Any, rows: int, step: int = 2048) -> PromptProcessingBatch:
    return PromptProcessingBatch(model, list(range(rows)), [make_prompt_cache(model) for _ in range(rows)],
                                 prefill_step_size=step)


def batch_state(batch: PromptProcessingBatch) -> list[Any]:
    return [batch.tokens] + [state(c) for c in batch.prompt_cache]


@pytest.mark.parametrize("pieces, step", [
    ([[3, 4, 5], [6, 7, 8]], 2048),  # same lengths: no padding
    ([[3, 4, 5, 9, 9], [6], [7, 7, 7]], 2048),  # padded on the right, moved to the left
    ([[3, 4, 5, 9, 9, 2, 2], [6, 1]], 3),  # a piece longer than the batch's step runs in several model calls
])
def test_the_queued_prompt_pass_fills_the_caches_as_mlx_lms_pass_does(
    tiny: Any, pieces: list[list[int]], step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = mlx_lm_passes(monkeypatch)
    ours, theirs = prompt_batch(tiny, len(pieces), step), prompt_batch(tiny, len(pieces), step)
    for _ in range(2):  # a second piece on top of the first
        with batch_cache.pieces_of(16):  # every piece shorter than the pacer's: the prompts end here
            batch_cache.prompt_without_waiting(ours, [list(p) for p in pieces])
        batch_cache._MLX_LM_PROMPT(theirs, [list(p) for p in pieces])
        assert batch_state(ours) == batch_state(theirs)
    assert len(asked) == 2  # only the two passes of `theirs`: ours ran queued


def mlx_lm_passes(monkeypatch: pytest.MonkeyPatch) -> list[list[list[int]]]:
    """The passes handed to mlx-lm's own prompt pass from now on (the original still runs them)."""
    passes: list[list[list[int]]] = []
    original = batch_cache._MLX_LM_PROMPT

    def recorded(batch: Any, tokens: list[list[int]]) -> None:
        passes.append([list(t) for t in tokens])
        original(batch, tokens)

    monkeypatch.setattr(batch_cache, "_MLX_LM_PROMPT", recorded)
    return passes


def test_a_pass_with_more_of_its_prompts_to_come_or_too_wide_is_mlx_lms_own(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full piece (the pacer's size: more of a long prompt follows) is waited for and timed; so is a very wide
    pass. A pass whose pieces all end their prompts is queued."""
    passes = mlx_lm_passes(monkeypatch)
    monkeypatch.setattr(batch_cache, "QUEUED_PASS_MAX_TOKENS", 8)
    with batch_cache.pieces_of(4):
        batch_cache.prompt_without_waiting(prompt_batch(tiny, 2), [[1, 2, 3], [5]])  # tails: queued
        batch_cache.prompt_without_waiting(prompt_batch(tiny, 2), [[1, 2, 3, 4], [6]])  # a full piece of 4
        batch_cache.prompt_without_waiting(prompt_batch(tiny, 3), [[1, 2, 3], [4], [5]])  # 3 x 3 = 9 tokens
    assert passes == [[[1, 2, 3, 4], [6]], [[1, 2, 3], [4], [5]]]


def test_outside_a_paced_step_the_batchs_own_step_is_the_piece(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    passes = mlx_lm_passes(monkeypatch)
    batch_cache.prompt_without_waiting(prompt_batch(tiny, 1, step=3), [[1, 2]])  # shorter than 3: queued
    batch_cache.prompt_without_waiting(prompt_batch(tiny, 1, step=3), [[1, 2, 3]])
    assert passes == [[[1, 2, 3]]]


def test_a_prompt_pass_needs_one_piece_per_row(tiny: Any) -> None:
    with pytest.raises(ValueError, match="2 prompt pieces for a batch of 3 rows"):
        batch_cache.prompt_without_waiting(prompt_batch(tiny, 3), [[1], [2]])


def staggered_tokens(model: Any) -> dict[int, list[int]]:
    """Greedy tokens of rows that join at different steps and finish at different steps (every finish filters)."""
    return run(model, STAGGERED, join=False, completion_batch_size=8, prefill_batch_size=2).tokens


def paired_tokens(model: Any) -> dict[int, list[int]]:
    """Greedy tokens of rows that join two at a time with prompts of different lengths, cut in pieces of 4: padded
    passes, full pieces and tails, rows joining while others still prefill or decode."""
    return run(model, PAIRED, join=False, completion_batch_size=8, prefill_batch_size=4, prefill_step_size=4).tokens


@pytest.mark.parametrize("tokens_of, lengths", [
    (staggered_tokens, [4 + 3 * i for i in range(6)]),
    (paired_tokens, [n for i in range(3) for n in (6 + 2 * i, 9 - i)]),
])
@pytest.mark.parametrize("gpu", [False, True])
def test_a_batch_whose_rows_come_and_go_generates_the_same_tokens(
    tiny: Any, gpu: bool, tokens_of: Callable[[Any], dict[int, list[int]]], lengths: list[int]
) -> None:
    batch_cache.uninstall()
    expected = tokens_of(tiny)
    batch_cache.install(gpu=gpu)
    assert tokens_of(tiny) == expected
    assert [len(t) for t in expected.values()] == lengths  # no stop tokens: every row runs to its max_tokens


def test_the_paired_run_takes_both_prompt_passes(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run above, with ours installed, queues some passes and leaves the full pieces to mlx-lm's pass."""
    batch_cache.install(gpu=True)
    passes = mlx_lm_passes(monkeypatch)
    every: list[int] = []
    ours = batch_cache.prompt_without_waiting

    def counted(batch: Any, tokens: list[list[int]]) -> None:
        every.append(len(tokens))
        ours(batch, tokens)

    monkeypatch.setattr(PromptProcessingBatch, "prompt", counted)
    paired_tokens(tiny)
    assert passes and len(every) > len(passes)
