"""Log probabilities of generated tokens, from the distribution each token was actually sampled from.

The engine's logprobs (after penalties and any grammar mask) are cut by the request's top_k and top_p and
scaled by its temperature, as the sampler sees them; greedy decoding reports the unscaled distribution (temperature 1),
whose most likely token is the one chosen. Token text and bytes come from the tokenizer's own byte view of
each token, so a token that is part of a UTF-8 character still shows its exact bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

from mlx_backend.contract import SamplingParams, TokenLogprob, TopLogprob
from mlx_backend.engine.sampling import GREEDY_BELOW, filter_logprobs

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(frozen=True, slots=True)
class RowOf:
    """Row `position` of a batch step's logprobs (rows x vocabulary), evaluated with the step as one array. It is
    sliced only when read, and on the reader's stream: a slice made inside the step would sit on the generation
    stream behind the next step's forward pass, and reading it would wait for that whole pass."""

    batch: mx.array
    position: int

    def row(self) -> mx.array:
        return self.batch[self.position]


class TokenText:
    """Token ids -> (text, bytes), cached per id: the same tokens come back again and again. How a token's
    bytes are spelled depends on the tokenizer's kind, which mlx-lm already told apart when it chose the
    model's streaming detokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        kind = type(getattr(tokenizer, "_detokenizer", None))
        self._spell = (
            _byte_level if issubclass(kind, BPEStreamingDetokenizer)
            else _sentencepiece if issubclass(kind, SPMStreamingDetokenizer)
            else self._decoded
        )
        self.of = functools.lru_cache(maxsize=65536)(self._of)

    def _of(self, token: int) -> tuple[str, bytes]:
        piece = self._tokenizer.convert_ids_to_tokens(token)
        raw = self._spell(piece if isinstance(piece, str) else "", token)
        return raw.decode("utf-8", errors="replace"), raw

    def _decoded(self, _: str, token: int) -> bytes:
        return str(self._tokenizer.decode([token])).encode()


def _byte_level(piece: str, _: int) -> bytes:
    """GPT-2 style byte-level BPE spells each byte as one printable character."""
    decoder = _byte_decoder()
    return bytes(decoder[ch] for ch in piece if ch in decoder)


def _sentencepiece(piece: str, _: int) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode()  # the word-start mark is a space


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable characters byte-level BPE uses back to the bytes they stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {byte: byte for byte in printable}
    extra = 256
    for byte in range(256):
        if byte not in chars:
            chars[byte] = extra
            extra += 1
    return {chr(code): byte for byte, code in chars.items()}


LOGPROB_FLOOR = -9999.0


def sampled_distribution(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """Log probabilities (1-D) of the distribution the sampler draws from for these settings."""
    if params.temperature < GREEDY_BELOW:
        return mx.maximum(logprobs, LOGPROB_FLOOR)  # a token a grammar masks is -inf
    # In the sampler's order: top_k and top_p on the model's logprobs, then temperature.
    logprobs = filter_logprobs(logprobs[None], params.top_k, params.top_p)[0]
    # float32: a small temperature (1e-5) scales half-precision logprobs past its range, and -inf - -inf is NaN
    scaled = logprobs.astype(mx.float32) * (1.0 / params.temperature)
    # a token the filters removed has probability 0: -9999 as OpenAI sends it, since JSON has no -inf
    return mx.maximum(scaled - mx.logsumexp(scaled, keepdims=True), LOGPROB_FLOOR)


def token_logprob(logprobs: mx.array | RowOf, token: int, params: SamplingParams, text: TokenText) -> TokenLogprob:
    """The entry for one generated token: its logprob and the `params.logprobs` most likely tokens."""
    if isinstance(logprobs, RowOf):
        logprobs = logprobs.row()
    distribution = sampled_distribution(logprobs.reshape(-1), params)
    k = min(params.logprobs or 0, MAX_TOP_LOGPROBS, distribution.shape[0])
    if k:
        top_ids = mx.argpartition(-distribution, k - 1)[:k]
        mx.eval(distribution, top_ids)
        ids: list[int] = top_ids.tolist()  # type: ignore[assignment]
        values: list[float] = distribution[top_ids].tolist()  # type: ignore[assignment]
        ranked = sorted(zip(ids, values, strict=True), key=lambda pair: -pair[1])
        top = tuple(TopLogprob(*text.of(i), _finite(v)) for i, v in ranked)
    else:
        top = ()
    chosen = distribution[token].item()
    assert isinstance(chosen, float)
    return TokenLogprob(*text.of(token), _finite(chosen), top)


def _finite(value: float) -> float:
    """JSON has no -inf: a token the sampler could not draw (cut by top_p, masked by a grammar) reports
    OpenAI's floor of -9999.0."""
    return max(value, -9999.0)
