"""Per-request sampling for mlx-lm's BatchGenerator: a sampler with its own PRNG key, and OpenAI's
logit_bias and presence/frequency penalties as logits processors. Filters apply top-k first, then top-p (the order of
Hugging Face and vLLM), then the temperature.

Shapes follow BatchGenerator: a sampler takes log-probabilities (rows, vocab) and returns token ids (rows,);
a logits processor takes (tokens so far, logits (1, vocab)) and returns logits.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import LogitsProcessor, Sampler, apply_top_k, apply_top_p, greedy_sampler

from mlx_backend.contract import SamplingParams


class SeededSampler:
    """Temperature, top-k and top-p sampling from a key of its own, so one request's draws do not depend on what
    else runs in the batch: the same seed and prompt give the same tokens."""

    def __init__(self, temperature: float, top_p: float, seed: int | None, top_k: int = 0) -> None:
        self._inv_temp = 1.0 / temperature
        self._top_p = top_p
        self._top_k = top_k
        self._key = mx.random.key(_as_key_seed(seed) if seed is not None else secrets.randbits(64))

    def __call__(self, logprobs: mx.array) -> mx.array:
        keys = mx.random.split(self._key)
        self._key, draw = keys[0], keys[1]
        logprobs = filter_logprobs(logprobs, self._top_k, self._top_p)
        return mx.random.categorical(logprobs * self._inv_temp, key=draw)

    def draws_ahead(self, logprobs: mx.array) -> mx.array:
        """Row i drawn as the (i+1)-th call from now would draw it, the key left where it is. Speculative
        decoding draws at every drafted position, keeps some, then `skip`s as many draws as it handed out: a
        seeded request's tokens do not depend on its drafts."""
        filtered = filter_logprobs(logprobs, self._top_k, self._top_p) * self._inv_temp
        key, drawn = self._key, []
        for row in range(logprobs.shape[0]):
            keys = mx.random.split(key)
            key = keys[0]
            drawn.append(mx.random.categorical(filtered[row:row + 1], key=keys[1]))
        return mx.concatenate(drawn)

    def skip(self, draws: int) -> None:
        for _ in range(draws):
            self._key = mx.random.split(self._key)[0]


def filter_logprobs(logprobs: mx.array, top_k: int, top_p: float) -> mx.array:
    """Top-k, then top-p, on (rows, vocab) log-probabilities: what the samplers draw from (before temperature)."""
    # A k as large as the vocabulary keeps every token (mlx-lm's apply_top_k refuses it): no filter then.
    if 0 < top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, top_k)
    if 0.0 < top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    return logprobs


# Temperatures this small are greedy decoding in effect, and 1/t would overflow float32 below ~3e-39 (every
# logit -inf, a garbage draw): treat them as greedy, as vLLM does below 1e-5.
GREEDY_BELOW = 1e-5


def _as_key_seed(seed: int) -> int:
    """OpenAI's seeds span signed int64; MLX keys take unsigned 64-bit seeds: map two's complement, one to one."""
    return seed & 0xFFFF_FFFF_FFFF_FFFF


_draws: Callable[[Sampler], Sampler] | None = None  # a group's rank: every sampler's tokens pass through it


def share_draws(through: Callable[[Sampler], Sampler]) -> None:
    """A group's rank (mlx_backend/engine/rank.py): every sampler made from now on returns `through(sampler)`, which
    gives every rank rank 0's tokens. Once per process, before any request."""
    global _draws
    _draws = through
    _greedy.cache_clear()
    _shared_sampler.cache_clear()


def _drawn(sampler: Sampler) -> Sampler:
    return sampler if _draws is None else _draws(sampler)


def make_sampler(params: SamplingParams) -> Sampler:
    # BatchGenerator samples the whole batch in one call only when every row has the same sampler object;
    # otherwise it samples row by row. So requests share a sampler unless a seed gives them their own key.
    if params.temperature < GREEDY_BELOW:
        return _greedy()
    if params.seed is None:
        return _shared_sampler(params.temperature, params.top_p, params.top_k)
    return _drawn(SeededSampler(params.temperature, params.top_p, params.seed, params.top_k))


@functools.lru_cache(maxsize=1)
def _greedy() -> Sampler:
    return _drawn(greedy_sampler)


@functools.lru_cache(maxsize=64)
def _shared_sampler(temperature: float, top_p: float, top_k: int = 0) -> Sampler:
    """Unseeded sampling for every request with these settings, from MLX's global key (MLX thread only)."""
    inv_temp = 1.0 / temperature

    def sample(logprobs: mx.array) -> mx.array:
        return mx.random.categorical(filter_logprobs(logprobs, top_k, top_p) * inv_temp)

    return _drawn(sample)


class PenaltyProcessor:
    """OpenAI semantics: logit[t] -= presence * (count[t] > 0) + frequency * count[t], where count covers the
    tokens generated so far (not the prompt). Counts are kept incrementally: one scatter per step."""

    def __init__(self, presence: float, frequency: float, prompt_tokens: int) -> None:
        self._presence = presence
        self._frequency = frequency
        self._seen = prompt_tokens  # BatchGenerator's token context starts with the whole prompt
        self._counts: mx.array | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._counts is None:
            self._counts = mx.zeros((logits.shape[-1],), dtype=mx.float32)
        new = tokens[self._seen:]
        if new.size:
            self._counts = self._counts.at[new].add(1.0)
            self._seen = tokens.size
        penalty = self._frequency * self._counts
        if self._presence:
            penalty = penalty + self._presence * (self._counts > 0)
        return logits - penalty.astype(logits.dtype)


class LogitBiasProcessor:
    """OpenAI's logit_bias: a fixed amount added to some tokens' logits at every step (-100 bans a token in
    effect, +100 all but forces it). The ids are known to be the model's tokens (the plan checks them)."""

    def __init__(self, bias: tuple[tuple[int, float], ...]) -> None:
        self._ids = mx.array([token for token, _ in bias])
        self._amounts = mx.array([amount for _, amount in bias], dtype=mx.float32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[..., self._ids].add(self._amounts.astype(logits.dtype))


def make_logits_processors(params: SamplingParams, prompt_tokens: int) -> list[LogitsProcessor]:
    """Bias, then penalties; none at all keeps BatchGenerator on its fast path."""
    processors: list[LogitsProcessor] = []
    if params.logit_bias:
        processors.append(LogitBiasProcessor(params.logit_bias))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(PenaltyProcessor(params.presence_penalty, params.frequency_penalty, prompt_tokens))
    return processors
