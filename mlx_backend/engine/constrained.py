"""Constrained decoding: a logits processor that lets a request sample only tokens its grammar allows.

    compiler = compiler_for(tokenizer)                      # once per loaded model (cached), MLX thread
    processor = compiler.processor(constraint, max_tokens)  # per request; ConstraintError if it cannot be compiled
    # pass it LAST in the request's logits_processors (after penalties), to BatchGenerator.insert or
    # SoloGeneration; after each token of the request: processor.raise_if_failed()

The processor follows mlx-lm's calling convention (`BatchGenerator`'s `GenerationBatch._step`, and
`SoloGeneration._feed`): once per generated token, with every token so far (prompt included; the last one
is the token just sampled, still lazy) and the logits (1, width) of the next. The first call sees the prompt
and consumes nothing; each later call consumes the last token, and reads no other (so a request alone passes
only the tokens its step feeds). A batch step the batcher planned may not call it at all: its mask is then
applied with the whole batch's (mlx_backend/engine/masks.py). The processor object must move with its
request (solo -> batch hand-off keeps the same list), which is what makes counting calls correct.

Speed: the masks of a step are computed while its forward pass runs, every constrained row's in one call,
and applied on the device (`mlx_backend/engine/masks.py`, which also says when a matcher advances). The batcher
plans each batch step for all its constrained rows (`plan`); a call that was not planned is a step of its
own row.

The closing reserve: given the request's max_tokens, the processor closes what is open before the budget
runs out. In the last RESERVE_WINDOW tokens it asks `mlx_backend/engine/closing.py` how many tokens closing the
output takes; once the budget left is that plus RESERVE_MARGIN (room for one token of the model's to open
something more), each step is guided: of the model's GUIDE_CANDIDATES most likely tokens (that the grammar
allows), the first after which the output can still close in the budget left, else the closing plan's next
token. So the model keeps writing (say "Paris") as long as the budget allows, and the output closes by the
last token. That step waits for the logits (no overlap with the forward pass) and tries up to a few plans;
outside the window the check costs one comparison per token. Once the model's own choice was overruled,
`closed_by_reserve` tells the batcher to report finish_reason "length".

Grammar semantics (what JSON is allowed, strict vs non-strict) live in `mlx_backend/grammar.py`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer

from mlx_backend.contract import Constraint
from mlx_backend.engine.closing import Closer, special_tokens
from mlx_backend.engine.masks import MaskStep
from mlx_backend.grammar import ConstraintError, describe_error, grammar_for

__all__ = ["ConstraintError", "ConstraintFailed", "ConstraintProcessor", "GrammarCompiler", "compiler_for"]

_async_eval: Callable[..., None] = mx.async_eval  # untyped in mlx

RESERVE_WINDOW = 64  # the closing reserve looks at the output in the last this many tokens of the budget
RESERVE_MARGIN = 6  # guiding starts when the budget left is the closing plan plus this: one token of the
# model's (a comma, a key, an opening quote) can lengthen the plan by about this much
GUIDE_CANDIDATES = 8  # the model's most likely tokens looked at, per guided step
_MATCHERS = 64  # compiled grammars kept per tokenizer, ready to copy


class ConstraintFailed(RuntimeError):
    """The matcher failed mid-generation (a token it rejected, a grammar too complex to continue, no token
    allowed). Should not happen; the request fails, the engine goes on."""


class GrammarCompiler:
    """Compiles constraints against one model's tokenizer. Building the llguidance tokenizer reads the whole
    vocabulary (tens of milliseconds for 128k tokens, see docs/benchmarks.md), so there is one per tokenizer:
    get it with `compiler_for`."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Iterable[int]) -> None:
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))
        if not self.eos_token_ids:
            raise ConstraintError("This model has no EOS token, so a constrained completion could not end.")
        try:
            # Every EOS id of the model, so whichever the model prefers ends a complete output.
            self.tokenizer: LLTokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=list(self.eos_token_ids))
        except ValueError as exc:  # e.g. a slow (non-Rust) tokenizer
            raise ConstraintError(f"Structured output is not available for this model's tokenizer: {exc}") from None
        self.words = (self.tokenizer.vocab_size + 31) // 32  # the bitmask's 32-bit words
        self._lock = threading.Lock()  # guards the caches below
        eos = np.zeros((self.words,), dtype=np.uint32)
        for token in self.eos_token_ids:
            eos[token // 32] |= np.uint32(1 << (token % 32))
        self.eos_words = eos.view(np.int32)  # the bitmask that allows only EOS
        self._bitmask = np.zeros((8, self.words), dtype=np.int32)  # a step's masks: (rows, words), reused
        # grammar -> a matcher that has consumed nothing: a request gets a copy (microseconds), where
        # compiling a bounded schema takes milliseconds and agents send the same schema every time
        self._matchers: dict[str, LLMatcher] = {}
        self.closer = Closer(self.tokenizer, special_tokens(hf_tokenizer), self.eos_token_ids)

    def processor(self, constraint: Constraint, max_tokens: int | None = None) -> ConstraintProcessor:
        """A fresh processor for one request; with `max_tokens`, it closes the output before that budget
        runs out. Raises ConstraintError (message for a 400) if the constraint cannot be compiled against
        this tokenizer (e.g. a special token the vocabulary lacks)."""
        grammar = grammar_for(constraint)
        with self._lock:
            pristine = self._matchers.pop(grammar, None)
        if pristine is None:
            pristine = LLMatcher(self.tokenizer, grammar, log_level=0)
            if pristine.is_error():
                raise ConstraintError(describe_error(constraint, _first_line(pristine.get_error())))
        with self._lock:
            self._matchers[grammar] = pristine  # most recently used last
            while len(self._matchers) > _MATCHERS:
                del self._matchers[next(iter(self._matchers))]
        return ConstraintProcessor(pristine.deep_copy(), self, max_tokens)

    def bitmask(self, rows: int) -> np.ndarray:
        """Room for `rows` masks (one step at a time, on the MLX thread or, on a GPU, the mask thread; a step's
        masks go to the device before the next step asks)."""
        if len(self._bitmask) < rows:
            self._bitmask = np.zeros((max(rows, 2 * len(self._bitmask)), self.words), dtype=np.int32)
        return self._bitmask[:rows]


_compilers: weakref.WeakKeyDictionary[Any, GrammarCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Any) -> GrammarCompiler:
    """The compiler of an mlx-lm TokenizerWrapper, built on first use and dropped with the tokenizer (when
    the model cache lets the model go)."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = GrammarCompiler(tokenizer._tokenizer, tokenizer.eos_token_ids)
        return compiler


class ConstraintProcessor:
    """A logits processor for one request: -inf for every token the grammar does not allow next (and for the
    embedding's padding past the vocabulary). EOS is allowed only where the grammar is complete; once nothing
    else can follow, EOS is the only token, so the request ends with finish_reason "stop".

    It never raises inside a step, where an exception would fail every row of the batch: a matcher failure
    is kept, only EOS is allowed from then on, and `raise_if_failed` raises ConstraintFailed for the batcher
    to fail this request alone."""

    def __init__(self, matcher: LLMatcher, compiler: GrammarCompiler, max_tokens: int | None = None) -> None:
        self._matcher = matcher
        self.compiler = compiler
        self._max_tokens = max_tokens
        self._guided = False  # closing is near: each token is chosen so that the output can still close
        self.closed_by_reserve = False  # the reserve overruled the model: the request ends for "length"
        self._plan_after = 0  # tokens consumed before the reserve plans again
        self._started = False
        self._error: str | None = None
        self._step: MaskStep | None = None  # the batch step the batcher planned for this row's next call
        self.tokens = 0  # tokens consumed (the generated ones)

    @property
    def started(self) -> bool:
        """Whether it has been called once: from then on each step feeds it the token sampled before."""
        return self._started

    def plan(self, step: MaskStep | None) -> None:
        """The batch path: this row's next call is part of `step`, which computes every row's mask at once
        (None: forget a plan the step did not use)."""
        self._step = step

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        step, self._step = self._step, None
        if step is None:  # not planned: a step of this row alone
            fed = None
            if self._started:  # the token sampled in the previous step, which this step feeds
                fed = tokens if tokens.shape[0] == 1 else tokens[-1:]  # a request alone passes just that token
                _async_eval(fed)  # queued before the forward pass: reading it does not wait for that
            step = MaskStep([self], fed, [0])
        return step.masked(self, logits)

    # The step's parts, in order (mlx_backend/engine/masks.py): prepare, then check the mask, then finish.

    def prepare(self, token: int | None) -> LLMatcher | None:
        """Consume the token this step feeds (nothing in the first step, which feeds the prompt) and see whether
        closing is near. The matcher whose mask the step needs; None once failed (only EOS is allowed)."""
        if self._started and token is not None:
            self._consume(token)
        self._started = True
        left = None if self._max_tokens is None else self._max_tokens - self.tokens
        if self._error is None and left is not None and left <= RESERVE_WINDOW and not self._guided:
            self._guided = self._closing_is_near(left)
        return None if self._error is not None else self._matcher

    def check(self, words: np.ndarray) -> bool:
        """Whether the mask the matcher wrote (`words`) is one to apply; False once failed (EOS only)."""
        if self._error is None:
            if self._matcher.is_error():
                self._fail(_first_line(self._matcher.get_error()))
            elif not np.count_nonzero(words):  # (faster than words.any())
                self._fail("no token can continue the output")
        return self._error is None

    @property
    def guides(self) -> bool:
        """Whether `finish` replaces this step's masked logits (closing is near)."""
        return self._guided and self._error is None

    def finish(self, masked: mx.array, logits: mx.array) -> mx.array:
        """The logits to sample from: `masked`, or once closing is near, the one token chosen to close."""
        if not self.guides:
            return masked
        token = self._guide(masked)
        return mx.where(mx.arange(logits.shape[-1]) == token, logits, -mx.inf)

    # Both describe the tokens fed back so far: a token is consumed when it is fed to the model, one step
    # after it was handed out; the EOS that follows a complete output is what ends the request.

    def is_accepting(self) -> bool:
        """Whether the output so far is complete: EOS would end it validly."""
        return self._error is None and bool(self._matcher.is_accepting())

    def is_stopped(self) -> bool:
        """Whether nothing but EOS can follow (complete, or failed: see `error`)."""
        return self._error is not None or bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self._error

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise ConstraintFailed(f"Constrained decoding failed: {self._error}")

    def _consume(self, token: int) -> None:
        if self._error is not None:
            return
        self.tokens += 1
        if not self._matcher.consume_token(token):
            self._fail(_first_line(self._matcher.get_error()) or f"token {token} was not allowed")

    def _closing_is_near(self, left: int) -> bool:
        """Whether the budget left is down to what closing the output takes, plus the margin."""
        if self.tokens < self._plan_after or self._matcher.is_accepting():
            return False
        plan = self.compiler.closer.closing(self._matcher, RESERVE_WINDOW)
        if plan is None:  # more than the window takes to close (a long minLength): guiding would not help
            self._plan_after = self.tokens + 8
            return False
        room = left - len(plan) - RESERVE_MARGIN
        if room <= 0:
            return True
        # One token can lengthen the plan by about the margin: no need to plan again before `room` could be
        # used up (a plan costs up to a millisecond or so).
        self._plan_after = self.tokens + room // (1 + RESERVE_MARGIN)
        return False

    def _guide(self, masked: mx.array) -> int:
        """The token for this step, once closing is near: of the model's most likely tokens that the grammar
        allows, the first after which the output can still be closed within the budget (EOS always can, once
        it is allowed); if none of them, the closing plan's next token. MLX thread; it waits for the logits."""
        assert self._max_tokens is not None
        left = self._max_tokens - self.tokens  # this token included
        k = min(GUIDE_CANDIDATES, masked.shape[-1])
        top = mx.argpartition(-masked[0], kth=k - 1)[:k]
        values: list[float] = masked[0][top].tolist()  # type: ignore[assignment]
        tokens: list[int] = top.tolist()  # type: ignore[assignment]
        ranked = [t for v, t in sorted(zip(values, tokens, strict=True), reverse=True) if v != -float("inf")]
        eos = set(self.compiler.eos_token_ids)
        closer = self.compiler.closer
        choice = None
        for token in ranked:
            if token in eos or closer.closes_after(self._matcher, token, left - 1):
                choice = token
                break
        if choice is None:
            plan = closer.plan(self._matcher, left)
            choice = plan[0] if plan else self.compiler.eos_token_ids[0]
        if not ranked or choice != ranked[0]:
            self.closed_by_reserve = True  # the model's own choice was overruled: the budget cut it
        return choice

    def _fail(self, message: str) -> None:
        self._error = message


def _first_line(message: str) -> str:
    """llguidance's errors carry a parser dump after the first line: keep it out of client messages."""
    return message.strip().splitlines()[0] if message.strip() else ""
