"""Draft tokens for speculative decoding, looked up in the text the request already holds.

A reply often repeats what its request holds: code an agent edits, a document it quotes, JSON it rewrites, or
the `prediction` a client sends (OpenAI's Predicted Outputs). Where the last few tokens of the text so far
occurred before, the tokens that followed them then are a cheap guess at what follows now. The solo path
(mlx_backend/engine/solo.py) feeds such a guess with the next token in one pass and keeps the part the
model itself would have produced: on a GPU, and on a CPU whose BLAS runs several rows at once, a pass of a few
tokens costs little more than a pass of one.

Tables map each n-gram (NGRAM_MIN..NGRAM_MAX tokens) to where it last ended, updated as tokens arrive: O(1) a
token, whatever the context's length. A longer match is tried first (it predicts better), and at one length the
prediction before the sequence's own text. Once the output follows the prediction, it stays aligned with it:
the next draft continues where the last one that was kept ended, even where the prediction repeats itself.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["NGRAM_MAX", "NGRAM_MIN", "DraftLookup"]

NGRAM_MAX = 4
NGRAM_MIN = 2  # one token repeats too often to predict anything


class DraftLookup:
    """The tokens so far (`extend` them as they come) and their n-grams; `draft` guesses what follows."""

    def __init__(self, tokens: Iterable[int] = (), source: Iterable[int] = ()) -> None:
        """`source`: text the output is likely to repeat that is not part of the sequence (a prediction)."""
        self._source = list(source)
        self._source_ends: dict[tuple[int, ...], int] = {}  # n-gram -> index just past its last occurrence
        _index(self._source, self._source_ends, 0, len(self._source) - 1)  # n-grams that something follows
        self._at: int | None = None  # where in the source the sequence is, while it follows the source
        self._tokens: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        start = len(self._tokens)
        for token in tokens:
            self._tokens.append(token)
            if self._at is not None:
                following = self._at < len(self._source) and self._source[self._at] == token
                self._at = self._at + 1 if following else None
        # The n-grams ending at the new last token are left out: what follows them is what `draft` guesses.
        _index(self._tokens, self._ends, start, len(self._tokens) - 1)

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens: the source's continuation while the sequence follows it, else what followed
        the longest earlier occurrence of the sequence's last n-gram."""
        if limit <= 0:
            return []
        if self._at is not None and self._at < len(self._source):
            return self._source[self._at:self._at + limit]
        tokens = self._tokens
        for n in range(min(NGRAM_MAX, len(tokens)), NGRAM_MIN - 1, -1):
            gram = tuple(tokens[-n:])
            end = self._source_ends.get(gram)
            if end is not None:
                self._at = end  # kept if the next tokens are the source's
                return self._source[end:end + limit]
            end = self._ends.get(gram)
            if end is not None:
                return tokens[end:end + limit]
        return []


def _index(text: list[int], ends: dict[tuple[int, ...], int], start: int, stop: int) -> None:
    """Record in `ends` every n-gram of `text` that ends at an index in [start, stop]."""
    for end in range(max(start, NGRAM_MIN), stop + 1):
        for n in range(NGRAM_MIN, min(NGRAM_MAX, end) + 1):
            ends[tuple(text[end - n:end])] = end
