"""The closing reserve: the tokens that close whatever a constrained output has open (a string, objects and
arrays, a tool call's markup), so that the output parses even when max_tokens cuts it.

The constrained-decoding processor asks for a plan in the last tokens of a request's budget; once what is
left is only the plan (plus a margin, `ConstraintProcessor`), it forces the plan token by token, and the
request ends there with finish_reason "length".

A plan is found greedily on a copy of the request's matcher, so every token of it is one the grammar allows:
the tokens llguidance says are forced (a `const`, the rest of a property name, a separator), else the first
the grammar allows of a short list, in this order:
- end markers (`</tool_call>`, `</think>`): whatever they close is done;
- inside a string (where a backslash would be allowed): the closing quote, with as many closers after it as
  one token holds (`"`, `"}`, `"}}`...);
- outside one: closers (`}`, `]`, `}}`, `]}`...), then start markers (`<tool_call>`; never a reasoning
  opener), then the shortest values (`0`, `""`, `false`, `null`, `[]`, `{}`), then separators (`,`, `:`);
- any single character the grammar allows (a string's minLength, a pattern), else any token it allows.
The processor follows the plan only where the model's own likely tokens would not leave room to close (see
`ConstraintProcessor`), so a property the schema requires and the model had not reached gets the keys from
the plan and, where the budget is too short for the model's own value, the shortest value the schema allows
(`""`, `0`, `false`, `[]`...): the output is valid, and finish_reason "length" says it was cut (docs/api.md,
"Structured output").
"""

from __future__ import annotations

import itertools
import string
from typing import Any

from llguidance import LLMatcher, LLTokenizer

_VALUES = ("0", '""', "false", "null", "[]", "{}", '"', "[", "{", "true")
_SEPARATORS = (",", ", ", ":", ": ", " ", "\n")


class Closer:
    """The candidate tokens of one tokenizer, found once (a few hundred tokenizations)."""

    def __init__(self, tokenizer: LLTokenizer, special_tokens: dict[str, int], eos_token_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer

        def single(text: str) -> int | None:
            ids = tokenizer.greedy_tokenize(text)
            return ids[0] if len(ids) == 1 and tokenizer.decode_bytes(ids) == text.encode() else None

        closers = ["".join(p) for n in range(1, 5) for p in itertools.product('"}]', repeat=n)]
        found = {text: single(text) for text in closers}
        by_length = sorted((t for t in found if found[t] is not None), key=len, reverse=True)
        # Inside a string: the quote, then closers; outside: closers only (a quote would open a string).
        self._string_closers = [i for t in by_length
                                if t[0] == '"' and '"' not in t[1:] and (i := found[t]) is not None]
        self._closers = [i for t in by_length if '"' not in t and (i := found[t]) is not None]
        self._values = [i for i in map(single, (*_VALUES, *_SEPARATORS)) if i is not None]
        self._backslash = single("\\")
        specials = {text: i for text, i in special_tokens.items() if i not in eos_token_ids}
        self._end_markers = [i for text, i in specials.items() if "/" in text]
        self._start_markers = [i for text, i in specials.items() if "/" not in text and "think" not in text.lower()]
        characters = string.digits + string.ascii_letters + string.punctuation + " "
        self._characters = [i for i in map(single, characters) if i is not None]

    def plan(self, matcher: LLMatcher, limit: int) -> list[int]:
        """Tokens that take `matcher`'s output (not changed) to one the grammar accepts, at most `limit` of
        them; shorter than that and not accepted only when nothing could be found."""
        return self._plan(matcher, limit)[0]

    def closing(self, matcher: LLMatcher, limit: int) -> list[int] | None:
        """The plan, if it closes the output within `limit` tokens; else None."""
        plan, closes = self._plan(matcher, limit)
        return plan if plan and closes else None

    def closes_after(self, matcher: LLMatcher, token: int, budget: int) -> bool:
        """Whether, after `token`, `matcher`'s output (not changed) can be closed within `budget` tokens."""
        copy = matcher.deep_copy()
        if not copy.consume_token(token):
            return False
        if copy.is_accepting():
            return True
        if budget <= 0:
            return False
        plan, closes = self._plan(copy, budget)
        return bool(plan) and closes

    def _plan(self, matcher: LLMatcher, limit: int) -> tuple[list[int], bool]:
        """The plan, and whether the output is accepted after it (read off the copy the plan was found on:
        a plan is cut where a token fails, so replaying it on another copy would end where this one did)."""
        copy = matcher.deep_copy()
        plan: list[int] = []
        while len(plan) < limit and not copy.is_accepting() and not copy.is_error():
            forced = copy.compute_ff_tokens()[: limit - len(plan)]
            if forced:
                if not copy.consume_tokens(forced):
                    break
                plan += forced
                continue
            token = self._next(copy)
            if token is None or not copy.consume_token(token):
                break
            plan.append(token)
        return plan, bool(copy.is_accepting()) and not copy.is_error()

    def _next(self, matcher: LLMatcher) -> int | None:
        in_string = self._backslash is not None and matcher.validate_tokens([self._backslash]) == 1
        groups: tuple[list[int], ...] = (
            (self._end_markers, self._string_closers, self._characters) if in_string
            else (self._end_markers, self._closers, self._start_markers, self._values, self._characters)
        )
        for group in groups:
            for token in group:
                if matcher.validate_tokens([token]) == 1:
                    return token
        return _first_allowed(matcher)


def _first_allowed(matcher: LLMatcher) -> int | None:
    mask = matcher.compute_bitmask()
    for index, byte in enumerate(mask):
        if byte:
            return index * 8 + (byte & -byte).bit_length() - 1
    return None


def special_tokens(hf_tokenizer: Any) -> dict[str, int]:
    """The tokenizer's added tokens (markers such as `<tool_call>`), text -> id."""
    added = getattr(hf_tokenizer, "added_tokens_decoder", None) or {}
    return {str(token): int(index) for index, token in added.items()}
