"""Draft tokens for speculative decoding, looked up in the text the request already holds.

A reply often repeats what its request holds: code an agent edits, a document it quotes, JSON it rewrites, or
the `prediction` a client sends (OpenAI's Predicted Outputs). Where the last few tokens of the text so far
occurred before, the tokens that followed them then are a cheap guess at what follows now. The solo path
(mlx_backend/engine/solo.py) feeds such a guess with the next token in one forward pass and keeps the part the
model itself would have produced: on a GPU, and on a CPU whose BLAS runs several rows at once, a pass of a few
tokens costs little more than a pass of one.

The table maps each n-gram (NGRAM_MIN..NGRAM_MAX tokens) to where it last ended, updated as tokens arrive:
O(1) a token, whatever the context's length. A longer match is tried first (it predicts better).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["NGRAM_MAX", "NGRAM_MIN", "DraftLookup"]

NGRAM_MAX = 4
NGRAM_MIN = 2  # one token repeats too often to predict anything


class DraftLookup:
    """The tokens so far (`extend` them as they come) and their n-grams; `draft` guesses what follows."""

    def __init__(self, tokens: Iterable[int] = (), source: Iterable[int] = ()) -> None:
        """`source`: text the reply is likely to repeat that is not part of the sequence (a prediction); its
        n-grams are looked up like the sequence's own, which win when both hold one."""
        self._source = list(source)
        self._tokens: list[int] = []
        # n-gram -> (in_source, index just past its last occurrence)
        self._ends: dict[tuple[int, ...], tuple[bool, int]] = {}
        self._index(self._source, in_source=True)
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        start = len(self._tokens)
        self._tokens.extend(tokens)
        self._index(self._tokens, in_source=False, start=start)

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest earlier occurrence of the sequence's last n-gram."""
        tokens = self._tokens
        if limit <= 0:
            return []
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(tokens) < n:
                continue
            found = self._ends.get(tuple(tokens[-n:]))
            if found is None:
                continue
            in_source, end = found
            text = self._source if in_source else tokens
            guess = text[end:end + limit]
            if guess:
                return guess
        return []

    def _index(self, text: list[int], in_source: bool, start: int = 0) -> None:
        """Record each n-gram ending in text[start:]; the sequence's own occurrence at its very end is recorded
        only once a token follows it (so `draft` finds an earlier one)."""
        for end in range(max(start, NGRAM_MIN), len(text) + 1):
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end - n < 0:
                    break
                gram = tuple(text[end - n:end])
                if not in_source and end == len(text):
                    continue  # its continuation is what we want to guess
                self._ends[gram] = (in_source, end)
