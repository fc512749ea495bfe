"""A lone request's decoding: the same tokens as mlx-lm's own generate_step, and a KV cache that holds exactly
the tokens it says it holds (what joining the batch relies on)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import trim_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from mlx_backend.engine.lookup import DraftLookup
from mlx_backend.engine.pacing import PrefillPacer
from mlx_backend.engine.sampling import PenaltyProcessor, SeededSampler
from mlx_backend.engine.solo import SoloGeneration
from tests.support import tiny_models as tm

PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = tm.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    loaded, _ = load(str(path))
    yield loaded


def reference(model: Any, n: int, processors: list[Any] | None = None) -> list[int]:
    steps = generate_step(mx.array(PROMPT), model, max_tokens=n, sampler=greedy_sampler,
                          logits_processors=processors)
    return [int(token) for token, _ in steps]


def solo(model: Any, prompt_cache: list[Any] | None = None, cached: int = 0, **kwargs: Any) -> SoloGeneration:
    kwargs.setdefault("sampler", greedy_sampler)
    kwargs.setdefault("logits_processors", None)
    kwargs.setdefault("prefill_step_size", 16)  # the 40-token prompt is prefilled in three chunks
    return SoloGeneration(model, PROMPT, prompt_cache, cached, **kwargs)


def test_greedy_tokens_are_generate_steps(model: Any) -> None:
    generation = solo(model)
    assert [generation.next_token(more=True) for _ in range(20)] == reference(model, 20)


def test_penalties_see_the_same_context_as_in_generate_step(model: Any) -> None:
    ours = solo(model, logits_processors=[PenaltyProcessor(2.0, 0.5, len(PROMPT))])
    theirs = reference(model, 20, [PenaltyProcessor(2.0, 0.5, len(PROMPT))])
    assert [ours.next_token(more=True) for _ in range(20)] == theirs


def test_the_cache_holds_exactly_the_tokens_it_reports(model: Any) -> None:
    generation = solo(model)
    handed_out = [generation.next_token(more=True) for _ in range(6)]
    # With `more`, every token handed out has been fed: the cache runs to the last one.
    assert generation.tokens_in_cache == PROMPT + handed_out
    last = generation.next_token(more=False)
    # Without, the last token is handed out but not fed: the batch feeds it when the request joins.
    assert generation.tokens_in_cache == PROMPT + handed_out
    assert all(layer.offset == len(PROMPT) + len(handed_out) for layer in generation.prompt_cache)
    assert [*handed_out, last] == reference(model, 7)


def test_a_prefix_from_the_cache_is_not_recomputed(model: Any) -> None:
    first = solo(model)
    first.next_token(more=False)  # prefill only: the cache holds the prompt
    trim_prompt_cache(first.prompt_cache, 1)  # as an exact prefix-cache hit is stepped back by one
    generation = solo(model, prompt_cache=first.prompt_cache, cached=len(PROMPT) - 1)
    assert generation.tokens_in_cache == PROMPT[:-1]
    tokens = [generation.next_token(more=True) for _ in range(5)]
    assert tokens == reference(model, 5)


def test_an_empty_prompt_is_refused(model: Any) -> None:
    with pytest.raises(ValueError):
        SoloGeneration(model, [], None, 0, greedy_sampler, None, 16).next_token(more=True)


class SlowPieces(PrefillPacer):
    """A pacer whose clock says every piece took a second: it halves the pieces as a slow device would."""

    def __init__(self) -> None:
        super().__init__(max_tokens=32, piece_s=0.5)
        self.size = 32
        self.pieces: list[int] = []

    def observe(self, tokens: int, seconds: float) -> None:
        self.pieces.append(tokens)
        super().observe(tokens, 1.0)


def test_a_paced_prefill_runs_in_the_pieces_its_pacer_sizes_with_progress_after_each(model: Any) -> None:
    pacer = SlowPieces()
    chunks: list[None] = []
    generation = solo(model, pacer=pacer, on_prefill_chunk=lambda: chunks.append(None))
    tokens = [generation.next_token(more=True) for _ in range(5)]
    assert pacer.pieces == [32, 7]  # 39 tokens before the last: 32, then the pacer's 16 (only 7 were left)
    assert len(chunks) == 2
    assert tokens == reference(model, 5)  # piece sizes never change the result


def fed_lengths(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The tokens each forward pass of `model`'s class feeds, in order."""
    lengths: list[int] = []
    forward = type(model).__call__

    def counted(self: Any, inputs: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        lengths.append(inputs.shape[1])
        return forward(self, inputs, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(type(model), "__call__", counted)
    return lengths


@pytest.mark.parametrize("penalties", [False, True])
def test_a_short_prompt_is_fed_in_one_pass_that_gives_the_first_token(
    model: Any, monkeypatch: pytest.MonkeyPatch, penalties: bool
) -> None:
    """On a GPU (the batcher's SOLO_ONE_PASS_TOKENS_GPU) a prompt within `one_pass_tokens` is one pass, as in
    stream_generate: the same tokens, the same cache, penalties seeing the same context."""
    def processors() -> list[Any] | None:
        return [PenaltyProcessor(2.0, 0.5, len(PROMPT))] if penalties else None

    lengths = fed_lengths(model, monkeypatch)
    chunks: list[None] = []
    generation = solo(model, logits_processors=processors(), one_pass_tokens=len(PROMPT),
                      on_prefill_chunk=lambda: chunks.append(None))
    tokens = [generation.next_token(more=True) for _ in range(6)]
    assert lengths == [len(PROMPT)] + [1] * 6  # the prompt and its first token in one pass, then a token a pass
    assert len(chunks) == 1  # progress for the stall clock
    assert generation.tokens_in_cache == PROMPT + tokens
    monkeypatch.undo()
    assert tokens == reference(model, 6, processors())


def test_a_prompt_longer_than_one_pass_is_prefilled_in_pieces(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = fed_lengths(model, monkeypatch)
    generation = solo(model, one_pass_tokens=len(PROMPT) - 1)
    tokens = [generation.next_token(more=True) for _ in range(3)]
    assert lengths == [16, 16, 7, 1] + [1] * 3  # 16-token pieces, the last prompt token, then a token a pass
    monkeypatch.undo()
    assert tokens == reference(model, 3)


# -- speculative decoding ----------------------------------------------------------------------------------
# The random tiny model's greedy output repeats itself (464 464 464 ..., 121 121 ...), so drafts from its own
# output are often right and sometimes wrong: both paths run.


def speculating(model: Any, prediction: list[int] | None = None, max_draft_tokens: int = 4) -> SoloGeneration:
    return solo(model, drafts=DraftLookup(PROMPT, source=prediction or []), max_draft_tokens=max_draft_tokens)


@pytest.mark.parametrize("max_draft_tokens", [1, 4, 16])
def test_speculative_decoding_gives_the_tokens_of_one_token_a_pass(model: Any, max_draft_tokens: int) -> None:
    generation = speculating(model, max_draft_tokens=max_draft_tokens)
    assert [generation.next_token(more=True) for _ in range(60)] == reference(model, 60)
    assert 0 < generation.accepted < generation.drafted


def test_a_seeded_sampled_request_draws_the_same_tokens_with_drafts_as_without(model: Any) -> None:
    # A low temperature keeps the random model's loops, so drafts are kept; the sampler's keys are used as
    # one token a pass uses them.
    plain = solo(model, sampler=SeededSampler(0.3, 1.0, seed=11))
    tokens = [plain.next_token(more=True) for _ in range(60)]
    drafting = solo(model, sampler=SeededSampler(0.3, 1.0, seed=11), drafts=DraftLookup(PROMPT),
                    max_draft_tokens=6)
    assert [drafting.next_token(more=True) for _ in range(60)] == tokens
    assert 0 < drafting.accepted < drafting.drafted
    # not a greedy run in disguise: the draws differ from greedy's
    assert tokens != reference(model, 60)


@pytest.mark.parametrize("leave_after", [4, 9, 14])
def test_a_seeded_request_that_leaves_mid_draft_goes_on_with_the_draws_of_one_token_a_pass(
    model: Any, leave_after: int
) -> None:
    plain = solo(model, sampler=SeededSampler(0.3, 1.0, seed=11))
    expected = [plain.next_token(more=True) for _ in range(40)]
    sampler = SeededSampler(0.3, 1.0, seed=11)
    generation = solo(model, sampler=sampler, drafts=DraftLookup(PROMPT, source=expected), max_draft_tokens=8)
    handed_out = [generation.next_token(more=True) for _ in range(leave_after)]
    assert generation._ready  # kept drafts wait: it leaves mid-draft
    last = generation.next_token(more=False)
    # the batch goes on with the same sampler, from the cache, fed the last token
    held = generation.tokens_in_cache
    rest = SoloGeneration(model, [*held, last], generation.prompt_cache, len(held), sampler, None, 16)
    after = [rest.next_token(more=True) for _ in range(10)]
    assert [*handed_out, last, *after] == expected[:leave_after + 11]


def test_a_prediction_of_the_whole_output_is_kept_nearly_whole(model: Any) -> None:
    expected = reference(model, 60)
    generation = speculating(model, prediction=expected, max_draft_tokens=8)
    assert [generation.next_token(more=True) for _ in range(60)] == expected
    # every token but the first (the prefill's) and the second (an n-gram needs two) can come from a kept draft,
    # and none is dropped; drafting from its own repeats alone keeps far fewer
    assert generation.accepted == generation.drafted >= 50
    without = speculating(model, max_draft_tokens=8)
    assert [without.next_token(more=True) for _ in range(60)] == expected
    assert without.accepted < generation.accepted - 20


def test_no_draft_runs_past_the_budget(model: Any) -> None:
    expected = reference(model, 60)
    generation = solo(model, drafts=DraftLookup(PROMPT, source=expected), max_draft_tokens=8, max_tokens=20)
    assert [generation.next_token(more=i < 19) for i in range(20)] == expected[:20]
    # a perfect prediction: every draft fed was handed out, none computed past the 20th token
    assert generation.accepted == generation.drafted > 0
    assert generation.tokens_in_cache == PROMPT + expected[:19]


def test_a_wrong_prediction_changes_nothing_but_the_drafts(model: Any) -> None:
    generation = speculating(model, prediction=list(range(300, 360)), max_draft_tokens=8)
    assert [generation.next_token(more=True) for _ in range(40)] == reference(model, 40)


@pytest.mark.parametrize("leave_after", [3, 8, 13, 21, 34])
def test_leaving_mid_draft_leaves_a_cache_that_holds_exactly_the_tokens_handed_out_but_the_last(
    model: Any, leave_after: int
) -> None:
    expected = reference(model, 60)
    generation = speculating(model, prediction=expected, max_draft_tokens=8)
    handed_out = [generation.next_token(more=True) for _ in range(leave_after)]
    last = generation.next_token(more=False)  # the row joins the batch, or its budget ends
    assert [*handed_out, last] == expected[:leave_after + 1]
    assert generation.accepted <= leave_after  # drafts trimmed off are not counted as kept
    assert generation.tokens_in_cache == PROMPT + handed_out
    assert all(layer.offset == len(PROMPT) + len(handed_out) for layer in generation.prompt_cache)
    # and the cache's contents are those tokens': fed the last token as a one-token prompt (the batch does),
    # it goes on exactly as a run alone
    held = generation.tokens_in_cache
    theirs = SoloGeneration(model, [*held, last], generation.prompt_cache, len(held), greedy_sampler, None, 16)
    assert [theirs.next_token(more=True) for _ in range(10)] == expected[leave_after + 1:leave_after + 11]


def test_drafting_needs_a_request_without_logits_processors(model: Any) -> None:
    with pytest.raises(ValueError):
        solo(model, logits_processors=[PenaltyProcessor(2.0, 0.5, len(PROMPT))], drafts=DraftLookup(PROMPT),
             max_draft_tokens=4)


class _WrongDrafts(DraftLookup):
    """Guesses that are never the token drawn: the reference's next tokens, each plus one."""

    def __init__(self, expected: list[int]) -> None:
        self.expected, self.generated = expected, -len(PROMPT)
        super().__init__(PROMPT)

    def extend(self, tokens: Any) -> None:
        tokens = list(tokens)
        self.generated += len(tokens)
        super().extend(tokens)

    def draft(self, limit: int) -> list[int]:
        return [t + 1 for t in self.expected[self.generated:self.generated + limit]]


def test_drafts_that_keep_failing_are_fed_ever_more_rarely(model: Any) -> None:
    expected = reference(model, 100)
    generation = solo(model, drafts=_WrongDrafts(expected), max_draft_tokens=8)
    assert [generation.next_token(more=True) for _ in range(100)] == expected
    # passes of 8, 4, 2, 1, 1, 1, 1 drafts, with 1, 2, 4, 8, 16, 32 tokens one a pass between them: 18 fed
    assert generation.accepted == 0 and generation.drafted <= 20
