"""Rows join the batch's step (mlx_backend/engine/joining.py): a generator whose new rows feed their last prompt
token in the batch's next step gives every row the tokens, finish reasons, logprobs and final caches of
mlx-lm's own generator, whether rows arrive alone, in pairs, mid-prefill or mid-decode, carry penalties, a
logit bias or their own sampler, run in a bounded cache, end at their first token, stop, or are removed
around their join; and it runs one forward pass fewer per join into a decoding batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx_lm
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache

from mlx_backend.contract import SamplingParams
from mlx_backend.engine import batch_cache, joining
from mlx_backend.engine.logprobs import RowOf
from mlx_backend.engine.sampling import SeededSampler, make_logits_processors
from tests.support import tiny_models as tm
from tests.support.generator_runs import PAIRED, STAGGERED, Arrival, Run, run


@pytest.fixture(scope="module")
def tiny() -> Iterator[Any]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        model, _ = load(str(tm.make_tiny_model(Path(folder) / "tiny", dtype="float32")))
        yield model


@pytest.fixture(autouse=True)
def _restore_methods() -> Iterator[None]:
    installed = BatchKVCache.filter, PromptProcessingBatch.prompt
    yield
    BatchKVCache.filter, PromptProcessingBatch.prompt = installed  # type: ignore[method-assign]


def assert_same(ours: Run, theirs: Run) -> None:
    assert ours.tokens == theirs.tokens
    assert ours.reasons == theirs.reasons
    assert ours.finals == theirs.finals  # what the prefix cache would keep of each finished row
    for uid, values in theirs.logprobs.items():
        assert ours.logprobs[uid] == pytest.approx(values, abs=1e-4)


def penalties_and_bias(prompts: list[list[int]]) -> dict[str, Any]:
    """Every row penalized, every other one biased toward token 3 (each row's processors are its own)."""
    params = [SamplingParams(max_tokens=50, temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7,
                             logit_bias=((3, 5.0),) if i % 2 else ()) for i in range(len(prompts))]
    return {"logits_processors": [make_logits_processors(params[i], len(prompt)) for i, prompt in enumerate(prompts)]}


def seeded_and_shared(prompts: list[list[int]]) -> dict[str, Any]:
    """Rows with their own seeded sampler beside rows on the generator's shared one."""
    return {"samplers": [SeededSampler(1.0, 1.0, seed=99 + len(p)) if len(p) % 4 == 1 else None for p in prompts]}


@pytest.mark.parametrize("arrivals, options", [
    (STAGGERED, {"completion_batch_size": 8, "prefill_batch_size": 2}),
    (PAIRED, {"completion_batch_size": 8, "prefill_batch_size": 4, "prefill_step_size": 4}),  # pieces of 4
    ([([[3], [4, 4]], [5, 5]), ([[6]], [3])], {}),  # one-token prompts: they join in the step they arrive
    (STAGGERED, {"completion_batch_size": 8, "prefill_batch_size": 2, "extras": penalties_and_bias}),
    (STAGGERED, {"completion_batch_size": 8, "prefill_batch_size": 2, "extras": seeded_and_shared}),
    (PAIRED, {"prefill_batch_size": 4, "prefill_step_size": 4, "max_kv_size": 6}),  # rotating caches
], ids=["staggered", "paired in pieces", "one-token prompts", "penalties and bias", "own samplers",
        "bounded cache"])
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu pass", "queued pass"])
def test_rows_joining_in_the_step_get_mlx_lms_tokens_logprobs_and_caches(
    tiny: Any, arrivals: list[Arrival], options: dict[str, Any], gpu: bool
) -> None:
    batch_cache.install(gpu=gpu)
    theirs = run(tiny, arrivals, join=False, **options)
    ours = run(tiny, arrivals, join=True, **options)
    assert_same(ours, theirs)
    assert sum(len(t) for t in ours.tokens.values()) == sum(sum(m) for _, m in arrivals)  # all ran to max_tokens


def test_each_join_into_a_decoding_batch_takes_one_pass_fewer(tiny: Any) -> None:
    """STAGGERED's six rows join one at a time: the first finds nothing decoding (its first step is the pass
    that feeds its last prompt token, as mlx-lm's first-token pass was), the other five join running rows."""
    options = {"completion_batch_size": 8, "prefill_batch_size": 2}
    theirs = run(tiny, STAGGERED, join=False, **options)
    ours = run(tiny, STAGGERED, join=True, **options)
    prompt_passes = [p for p in theirs.passes if p[1] > 1]
    assert [p for p in ours.passes if p[1] > 1] == prompt_passes == [(1, 2 + 2 * i) for i in range(6)]
    assert len(theirs.passes) - len(ours.passes) == 5


def test_a_row_can_end_at_its_first_token_by_length_or_by_a_stop_token(tiny: Any) -> None:
    arrivals: list[Arrival] = [([[5] * 4, [6] * 3], [6, 1]), ([[7] * 5], [6])]  # max_tokens 1 in the pair
    first = run(tiny, arrivals, join=False).tokens[2][0]  # the late row's first token, made its stop token
    theirs = run(tiny, arrivals, join=False, stop_tokens=[[first]])
    ours = run(tiny, arrivals, join=True, stop_tokens=[[first]])
    assert_same(ours, theirs)
    assert ours.reasons[1] == "length" and ours.tokens[1] == theirs.tokens[1] and len(ours.tokens[1]) == 1
    assert ours.reasons[2] == "stop" and ours.tokens[2] == [first]


@pytest.mark.parametrize("step", [1, 2, 3], ids=["queued", "in its prompt pass", "first token in flight"])
def test_removing_a_row_around_its_join_leaves_the_others_their_tokens(tiny: Any, step: int) -> None:
    """Removal happens between steps, where no row is halfway into the batch: a row is removed while queued,
    while its prompt is in the prompt batch, or right after the step that fed its last prompt token."""
    arrivals: list[Arrival] = [([[5] * 4], [8]), ([[6] * 3, [7] * 6], [8, 8])]
    theirs = run(tiny, arrivals, join=False, remove={step: 1})
    ours = run(tiny, arrivals, join=True, remove={step: 1})
    assert_same(ours, theirs)
    assert len(ours.tokens[0]) == len(ours.tokens[2]) == 8 and 1 not in ours.reasons


def test_only_a_generator_without_requests_can_be_made_to_join_in_the_step(tiny: Any) -> None:
    generator: Any = BatchGenerator(tiny, stop_tokens=[])
    generator.insert([[1, 2, 3]], max_tokens=[2])
    with pytest.raises(ValueError, match="no requests yet"):
        joining.join_in_step(generator)
    generator.close()


def test_the_mlx_lm_it_was_written_against_is_the_one_installed() -> None:
    """joining.py replaces BatchGenerator._next and reads its private state (_currently_processing, _make_batch,
    _counters) and GenerationBatch's constructor, which steps itself: re-read them before moving the pin."""
    assert mlx_lm.__version__ == "0.32.2"


def test_a_step_launches_the_batchs_logprobs_as_one_array_and_no_row_of_them(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlx-lm evaluates a slice of the logprobs per row every step; ours launches the step's tokens and the
    batch's logprobs (rows x vocabulary) only, and a row's logprobs are read from it when asked for (the
    logprobs above match mlx-lm's)."""
    launched: list[list[Any]] = []
    real = joining._async_eval

    def recording(*arrays: Any) -> None:
        launched.append(list(arrays))
        real(*arrays)

    monkeypatch.setattr(joining, "_async_eval", recording)
    options = {"completion_batch_size": 8, "prefill_batch_size": 2, "extras": penalties_and_bias}
    ours = run(tiny, STAGGERED, join=True, **options)
    assert ours == run(tiny, STAGGERED, join=True, **options)  # recording changed nothing
    vocab = tiny.args.vocab_size
    assert launched, "the engine's batch did not take its own step"
    for tokens, logprobs, contexts in launched:
        assert logprobs.ndim == 2 and logprobs.shape == (tokens.shape[0], vocab)
        assert len(contexts) == tokens.shape[0]  # every row has penalties: each its token context


def test_a_rows_logprobs_are_handed_out_unsliced_so_reading_them_never_waits_for_the_next_step(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slice made inside the step would be queued on the generation stream behind the step launched next, and
    reading it would wait for that whole pass: each response carries its row of the array the step launched,
    sliced by whoever reads it (the batcher, only for a request that asked for logprobs)."""
    launched: dict[int, Any] = {}
    real = joining._async_eval

    def recording(*arrays: Any) -> None:
        launched[id(arrays[1])] = arrays[1]
        real(*arrays)

    monkeypatch.setattr(joining, "_async_eval", recording)
    generator: Any = BatchGenerator(tiny, stop_tokens=[], completion_batch_size=4, prefill_batch_size=2)
    joining.join_in_step(generator)
    generator.insert([[5, 6, 7], [8, 9]], max_tokens=[4, 4])
    responses = []
    while generator._generation_batch.uids or generator._prompt_batch.uids or generator._unprocessed_sequences:
        responses.extend(generator.next()[1])
    generator.close()
    assert len(responses) == 8
    for response in responses:
        assert isinstance(response.logprobs, RowOf)
        assert id(response.logprobs.batch) in launched  # the step's one array, not a copy or a slice of it
        assert response.logprobs.row()[response.token].item() <= 0.0
