"""Constrained decoding: a logits processor that lets a request sample only tokens its grammar allows.

    compiler = compiler_for(tokenizer)                      # once per loaded model (cached), MLX thread
    processor = compiler.processor(constraint, max_tokens)  # per request; ConstraintError if it cannot be compiled
    # pass it LAST in the request's logits_processors (after penalties), to BatchGenerator.insert or
    # SoloGeneration; after each token of the request: processor.raise_if_failed()

The processor follows mlx-lm's calling convention (`BatchGenerator`'s `GenerationBatch._step`, and
`SoloGeneration._feed`): once per generated token, with every token so far (prompt included; the last one
is the token just sampled, still lazy) and the logits (1, width) of the next. The first call sees the prompt
and consumes nothing; each later call consumes the last token. The processor object must move with its
request (solo -> batch hand-off keeps the same list), which is what makes counting calls correct.

Speed: a call reads the sampled token, starts the forward pass (`mx.async_eval(logits)`: it does not depend
on the mask) and computes the mask on the CPU meanwhile. That overlaps fully for a solo request and for the
first constrained row of a batch; a later row's token context is queued behind that forward pass, so its
mask is computed after it (docs/benchmarks.md, "Constrained decoding", has the figures).

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

import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer

from mlx_backend.contract import Constraint
from mlx_backend.engine.closing import Closer, special_tokens
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
        self._eos_only: dict[int, mx.array] = {}  # logits width -> the mask that allows only EOS
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

    def eos_only(self, width: int) -> mx.array:
        with self._lock:
            mask = self._eos_only.get(width)
            if mask is None:
                allowed = np.zeros(width, dtype=np.bool_)
                allowed[[t for t in self.eos_token_ids if t < width]] = True
                mask = self._eos_only[width] = mx.array(allowed)
            return mask


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
        self._compiler = compiler
        self._max_tokens = max_tokens
        self._guided = False  # closing is near: each token is chosen so that the output can still close
        self.closed_by_reserve = False  # the reserve overruled the model: the request ends for "length"
        self._plan_after = 0  # tokens consumed before the reserve plans again
        self._bitmask = np.zeros((compiler.words,), dtype=np.int32)
        self._started = False
        self._error: str | None = None
        self._next_mask: Future[None] | None = None  # begun by `begin_step`, computing on a worker thread
        self.tokens = 0  # tokens consumed (the generated ones)

    @property
    def started(self) -> bool:
        """Whether it has been called once: from then on each step feeds it the token sampled before."""
        return self._started

    def begin_step(self, token: int) -> None:
        """The batch path: the batcher knows the token this step feeds before the step runs. Consume it and
        compute the next mask on a worker thread (llguidance drops the GIL), so the masks of every
        constrained row are computed at once, and while the forward pass runs: the call below only waits."""
        self._consume(token)
        self._next_mask = _workers().submit(self._compute_mask)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        width = logits.shape[-1]
        begun = self._next_mask
        if begun is not None:
            self._next_mask = None
            _async_eval(logits)  # the forward pass runs while the worker finishes the mask
            begun.result()
            return self._apply(logits, width)
        if self._started:
            # The token sampled in the previous step; waiting for it waits for nothing else yet.
            token = tokens[-1].item()
            assert isinstance(token, int)
            self._consume(token)
        self._started = True
        # Start the forward pass now (the mask does not depend on it) and compute the mask meanwhile.
        _async_eval(logits)
        self._compute_mask()
        return self._apply(logits, width)

    def _apply(self, logits: mx.array, width: int) -> mx.array:
        masked = mx.where(self._mask_array(width), logits, -mx.inf)
        if not self._guided or self._error is not None:
            return masked
        token = self._guide(masked)
        return mx.where(mx.arange(width) == token, logits, -mx.inf)

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

    def _compute_mask(self) -> None:
        """The tokens allowed next, into the bitmask (any thread: it touches only this request's state)."""
        left = None if self._max_tokens is None else self._max_tokens - self.tokens
        if self._error is None and left is not None and left <= RESERVE_WINDOW and not self._guided:
            self._guided = self._closing_is_near(left)
        if self._error is None:
            self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            if self._matcher.is_error():
                self._fail(_first_line(self._matcher.get_error()))
            elif not self._bitmask.any():
                self._fail("no token can continue the output")

    def _closing_is_near(self, left: int) -> bool:
        """Whether the budget left is down to what closing the output takes, plus the margin."""
        if self.tokens < self._plan_after or self._matcher.is_accepting():
            return False
        plan = self._compiler.closer.closing(self._matcher, RESERVE_WINDOW)
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
        eos = set(self._compiler.eos_token_ids)
        closer = self._compiler.closer
        choice = None
        for token in ranked:
            if token in eos or closer.closes_after(self._matcher, token, left - 1):
                choice = token
                break
        if choice is None:
            plan = closer.plan(self._matcher, left)
            choice = plan[0] if plan else self._compiler.eos_token_ids[0]
        if not ranked or choice != ranked[0]:
            self.closed_by_reserve = True  # the model's own choice was overruled: the budget cut it
        return choice

    def _mask_array(self, width: int) -> mx.array:
        """The bitmask as a bool array of the logits' width (MLX thread)."""
        if self._error is not None:
            return self._compiler.eos_only(width)
        # Bit i of the little-endian words is token i; `count` pads with zeros (disallowed) or cuts to width.
        return mx.array(np.unpackbits(self._bitmask.view(np.uint8), count=width, bitorder="little").view(np.bool_))

    def _fail(self, message: str) -> None:
        self._error = message


@functools.cache
def _workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="grammar-mask")


def _first_line(message: str) -> str:
    """llguidance's errors carry a parser dump after the first line: keep it out of client messages."""
    return message.strip().splitlines()[0] if message.strip() else ""
