"""Logprobs from the distribution a token was sampled from, and each token's exact bytes."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_backend.contract import SamplingParams
from mlx_backend.engine.logprobs import LOGPROB_FLOOR, TokenText, sampled_distribution, token_logprob
from mlx_backend.engine.sampling import make_sampler
from tests.support import tiny_models as tm


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> TokenText:
    path = tm.make_tiny_model(tmp_path_factory.mktemp("bytes") / "m", tokenizer="bytes")
    return TokenText(load_tokenizer(path))


def test_byte_level_tokens_give_their_exact_bytes_even_inside_a_character(byte_level: TokenText) -> None:
    tokenizer = byte_level._tokenizer
    for text in ("hello world", "naïve café", "日本"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(byte_level.of(i)[1] for i in ids) == text.encode()


def test_word_level_tokens_give_their_decoded_text(tmp_path: Path) -> None:
    text = TokenText(load_tokenizer(tm.make_tiny_model(tmp_path / "m")))
    token = text._tokenizer.convert_tokens_to_ids("hello")
    assert text.of(token) == ("hello", b"hello")


def test_the_distribution_is_the_samplers_temperature_and_top_p_included() -> None:
    logits = mx.array([2.0, 1.0, 0.5, -1.0])
    logprobs = logits - mx.logsumexp(logits)
    params = SamplingParams(max_tokens=1, temperature=0.5, top_p=0.8, seed=1)
    distribution = sampled_distribution(logprobs, params)
    assert math.isclose(float(mx.logsumexp(distribution).item()), 0.0, abs_tol=1e-5)
    draws = {int(make_sampler(params)(logprobs[None]).item()) for _ in range(50)}
    allowed = {i for i, v in enumerate(distribution.tolist()) if v > LOGPROB_FLOOR}  # type: ignore[union-attr]
    assert draws <= allowed and len(allowed) < 4  # top_p cut the tail the sampler never draws


def test_greedy_reports_the_models_own_distribution() -> None:
    logprobs = mx.log(mx.array([0.7, 0.2, 0.1]))
    distribution = sampled_distribution(logprobs, SamplingParams(max_tokens=1, temperature=0.0))
    assert mx.allclose(distribution, logprobs).item()


def test_an_entry_has_the_token_its_logprob_and_rivals_most_likely_first(byte_level: TokenText) -> None:
    logprobs = mx.log(mx.array([0.1, 0.6, 0.3] + [0.0] * 509))
    entry = token_logprob(logprobs, 2, SamplingParams(max_tokens=1, temperature=0.0, logprobs=2), byte_level)
    assert math.isclose(entry.logprob, math.log(0.3), rel_tol=1e-5)
    assert [round(t.logprob, 4) for t in entry.top] == [round(math.log(0.6), 4), round(math.log(0.3), 4)]
    assert entry.top[1].token_bytes == entry.token_bytes
    impossible = token_logprob(logprobs, 5, SamplingParams(max_tokens=1, temperature=0.0, logprobs=0), byte_level)
    assert impossible.logprob == -9999.0 and impossible.top == ()  # JSON has no -inf


def test_a_tiny_temperature_on_half_precision_logprobs_gives_numbers_not_nan() -> None:
    """1e-5 scales float16 logprobs past their range (found by schemathesis: JSON null logprobs)."""
    logprobs = (mx.array([2.0, 1.0, 0.5, -1.0]) - mx.logsumexp(mx.array([2.0, 1.0, 0.5, -1.0]))).astype(mx.float16)
    distribution = sampled_distribution(logprobs, SamplingParams(max_tokens=1, temperature=1e-5, seed=1))
    values = distribution.tolist()
    assert all(math.isfinite(v) for v in values) and values[0] > -1e-3  # type: ignore[union-attr]
    assert min(values) == LOGPROB_FLOOR  # type: ignore[type-var]
