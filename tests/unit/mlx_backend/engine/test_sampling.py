"""Per-request samplers and OpenAI penalties, on hand-made log-probabilities."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import greedy_sampler

from mlx_backend.contract import SamplingParams
from mlx_backend.engine.sampling import LogitBiasProcessor, PenaltyProcessor, make_logits_processors, make_sampler

LOGPROBS = mx.log(mx.array([[0.1, 0.2, 0.3, 0.4]]))


def draws(params: SamplingParams, n: int = 50) -> list[int]:
    sampler = make_sampler(params)
    return [int(sampler(LOGPROBS).tolist()[0]) for _ in range(n)]  # type: ignore[index,arg-type]


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=42)
    first = draws(params)
    mx.random.seed(123)  # the global PRNG must not matter
    assert draws(params) == first
    assert draws(SamplingParams(max_tokens=1, temperature=1.0, seed=43)) != first
    assert len(set(first)) > 1


def test_unseeded_samplers_differ() -> None:
    params = SamplingParams(max_tokens=1, temperature=1.0)
    assert draws(params) != draws(params)


def test_temperature_zero_is_the_shared_greedy_sampler() -> None:
    sampler = make_sampler(SamplingParams(max_tokens=1, temperature=0.0, seed=1))
    assert sampler is greedy_sampler
    assert sampler(LOGPROBS).tolist() == [3]


def test_tiny_top_p_keeps_only_the_best_token() -> None:
    assert set(draws(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.05, seed=7))) == {3}


def test_top_k_samples_only_among_the_k_most_likely_tokens() -> None:
    assert set(draws(SamplingParams(max_tokens=1, temperature=1.0, top_k=1, seed=5))) == {3}
    two = draws(SamplingParams(max_tokens=1, temperature=1.0, top_k=2, seed=5), n=200)
    assert set(two) == {2, 3}
    unseeded = draws(SamplingParams(max_tokens=1, temperature=1.0, top_k=2), n=200)  # the shared sampler
    assert set(unseeded) == {2, 3}


def test_top_k_of_the_whole_vocabulary_or_zero_keeps_every_token() -> None:
    for k in (0, 4, 100):
        assert set(draws(SamplingParams(max_tokens=1, temperature=1.0, top_k=k, seed=9), n=300)) == {0, 1, 2, 3}


def test_top_k_applies_before_top_p() -> None:
    # Top-p first would keep 0.4 and 0.3 (0.7 > 0.5 only with both); after top-k 2, top-p 0.5 keeps 0.4 alone.
    assert set(draws(SamplingParams(max_tokens=1, temperature=1.0, top_k=2, top_p=0.5, seed=2))) == {3}


def test_low_temperature_concentrates_on_the_best_token() -> None:
    got = draws(SamplingParams(max_tokens=1, temperature=0.01, seed=3))
    assert set(got) == {3}


def test_sampler_handles_one_row_of_a_batch() -> None:
    sampler = make_sampler(SamplingParams(max_tokens=1, temperature=1.0, seed=3))
    assert sampler(mx.concatenate([LOGPROBS, LOGPROBS])[1:2]).shape == (1,)


def test_penalties_follow_openai_and_ignore_the_prompt() -> None:
    processor = PenaltyProcessor(presence=0.5, frequency=0.25, prompt_tokens=3)
    logits = mx.zeros((1, 5))
    prompt = mx.array([0, 0, 4])
    assert processor(prompt, logits).tolist() == [[0.0] * 5]
    generated = mx.array([0, 0, 4, 1, 1, 2])  # tokens 1 (x2) and 2 (x1) generated
    out = processor(generated[:4], logits)  # steps arrive one token at a time
    out = processor(generated[:5], logits)
    out = processor(generated, logits)
    expected = [0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0.0, 0.0]
    assert mx.allclose(out, mx.array([expected])).item()


def test_penalty_keeps_logits_dtype() -> None:
    processor = PenaltyProcessor(presence=1.0, frequency=0.0, prompt_tokens=0)
    out = processor(mx.array([2]), mx.zeros((1, 4), dtype=mx.float16))
    assert out.dtype == mx.float16
    assert out.tolist() == [[0.0, 0.0, -1.0, 0.0]]


def test_no_penalties_and_no_bias_no_processors() -> None:
    assert make_logits_processors(SamplingParams(max_tokens=1), 10) == []
    assert len(make_logits_processors(SamplingParams(max_tokens=1, frequency_penalty=0.1), 10)) == 1
    both = make_logits_processors(SamplingParams(max_tokens=1, frequency_penalty=0.1, logit_bias=((1, 1.0),)), 10)
    assert [type(p) for p in both] == [LogitBiasProcessor, PenaltyProcessor]  # bias first, as OpenAI's docs


def test_logit_bias_adds_its_amounts_to_those_tokens_at_every_step_in_the_logits_dtype() -> None:
    processor = LogitBiasProcessor(((1, -100.0), (3, 2.5)))
    logits = mx.zeros((1, 5), dtype=mx.float16)
    for step in range(2):
        out = processor(mx.array([0] * (step + 1)), logits)
        assert out.dtype == mx.float16 and out.tolist() == [[0.0, -100.0, 0.0, 2.5, 0.0]]


def test_a_100_bias_wins_a_greedy_draw_and_a_minus_100_bias_loses_it() -> None:
    logits = mx.log(mx.array([[0.1, 0.2, 0.3, 0.4]]))
    assert greedy_sampler(LogitBiasProcessor(((0, 100.0),))(mx.array([0]), logits)).item() == 0
    assert greedy_sampler(LogitBiasProcessor(((3, -100.0),))(mx.array([0]), logits)).item() == 2


def test_unseeded_requests_with_the_same_settings_share_one_sampler() -> None:
    # BatchGenerator batches sampling only when every row holds the very same sampler object.
    from mlx_backend.contract import SamplingParams
    from mlx_backend.engine.sampling import make_sampler

    a = make_sampler(SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9))
    b = make_sampler(SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9))
    seeded = make_sampler(SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9, seed=1))
    assert a is b and seeded is not a
    assert make_sampler(SamplingParams(max_tokens=1, temperature=0.0)) is make_sampler(
        SamplingParams(max_tokens=1, temperature=0.0, seed=5))
