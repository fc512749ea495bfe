"""A request alone with its model, decoded the way `mlx_lm.stream_generate` decodes: a plain KV cache and one
token in flight while the previous one is handed out.

Through BatchGenerator a batch of one pays for the batch: a padded batch cache, masked attention and per-row
bookkeeping. On a GPU, where a small model's step is a few milliseconds of kernel launches, that cost a lone
stream a third or more of its speed. So a request that finds its model idle runs here, and moves into the
batch (its KV cache with it, nothing recomputed) as soon as a second request for the model arrives.

A solo request may also decode speculatively (`drafts`): where the text so far ends in an n-gram seen before
(mlx_backend/engine/lookup.py), the tokens that followed it are fed with the next token in one pass, and each
is kept while it is the token the request's own sampler draws at its place: the output is what one token a
pass would give (at any temperature: every kept token is the sampler's draw given the tokens before it). The
tokens kept wait in `_ready` (already in the KV cache) and are handed out one a call, like any other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import TokenBuffer, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import LogitsProcessor, Sampler

from mlx_backend import timeline
from mlx_backend.engine.constrained import ConstraintProcessor
from mlx_backend.engine.lookup import DraftLookup
from mlx_backend.engine.pacing import PrefillPacer
from mlx_backend.engine.sampling import SeededSampler

# The library's untyped calls, given types once here.
_async_eval: Callable[..., None] = mx.async_eval
_token_buffer: Callable[[list[int]], Any] = TokenBuffer
# mlx-lm annotates it as returning the cache; it returns the number of tokens it dropped
_trim = cast(Callable[[list[Any], int], int], trim_prompt_cache)

MAX_BACKOFF = 64  # tokens decoded one a pass after failed drafts, at most


def prefill(
    model: Any, tokens: list[int], prompt_cache: list[Any], pacer: PrefillPacer, on_chunk: Callable[[], None]
) -> None:
    """Run `tokens` into `prompt_cache` in pieces the pacer sizes (mlx_backend/engine/pacing.py); `on_chunk` after each
    (progress for the stall clock: a long prompt is not a hang)."""
    start = 0
    while start < len(tokens):
        piece = tokens[start:start + pacer.size]
        began = time.monotonic()
        model(mx.array(piece)[None], cache=prompt_cache)
        mx.eval([c.state for c in prompt_cache])
        pacer.observe(len(piece), time.monotonic() - began)
        start += len(piece)
        on_chunk()


class SoloGeneration:
    """Tokens of one request, one per `next_token` call; the first call also runs the prefill."""

    def __init__(
        self,
        model: Any,
        prompt: list[int],
        prompt_cache: list[Any] | None,
        cached_tokens: int,
        sampler: Sampler,
        logits_processors: list[LogitsProcessor] | None,
        prefill_step_size: int,
        on_prefill_chunk: Callable[[], None] = lambda: None,
        pacer: PrefillPacer | None = None,  # None: fixed pieces of prefill_step_size
        one_pass_tokens: int = 0,
        drafts: DraftLookup | None = None,  # speculative decoding from this lookup (no logits processors)
        max_draft_tokens: int = 0,
        max_tokens: int | None = None,  # the request's budget: no draft runs past it (None: unbounded)
    ) -> None:
        """A prompt whose uncached rest is at most `one_pass_tokens` long is fed in one pass that also gives
        the first token (mlx-lm's stream_generate does so); a longer one (or any, with 0) is prefilled in
        paced pieces, then its last token is fed for the first token. The one pass computes the logits of
        every position it feeds: cheap on a GPU, where it saves a pass and a wait; not on a CPU."""
        self.model = model
        self.sampler = sampler
        self.logits_processors = logits_processors or []
        self.prompt_cache: list[Any] = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
        self.tokens_in_cache: list[int] = prompt[:cached_tokens]  # exactly what the KV cache holds
        self._rest = prompt[cached_tokens:]
        self._pacer = pacer or PrefillPacer.fixed(prefill_step_size)
        self._on_prefill_chunk = on_prefill_chunk
        self._one_pass_tokens = one_pass_tokens
        # Every token so far, for processors that read them (penalties); a grammar reads only the token a step
        # feeds, so a request whose only processor is its grammar keeps no context (a buffer update a step).
        needs_context = any(not isinstance(p, ConstraintProcessor) for p in self.logits_processors)
        self._context = _token_buffer(self.tokens_in_cache) if needs_context else None
        self._pending: tuple[mx.array, mx.array] | None = None  # the next token and its logprobs, computing
        self.logprobs: mx.array | None = None  # the distribution the last token was drawn from
        self.prefilled = 0  # prompt tokens the last `next_token` call prefilled (the first call's work)
        if drafts is not None and (self.logits_processors or max_draft_tokens <= 0):
            raise ValueError("speculative decoding needs draft tokens and a request without logits processors")
        self._drafts = drafts
        self._max_draft_tokens = max_draft_tokens
        # Grows by 2 while drafts are kept whole, shrinks by 1 when some are kept, halves when none is.
        self._draft_limit = max_draft_tokens
        # After a pass that kept no draft, this many tokens go one a pass; doubled at each such pass in a row
        # (up to MAX_BACKOFF), so text whose guesses keep failing costs few wasted passes.
        self._backoff = 1
        self._undrafted = 0  # tokens left to decode one a pass
        self._ready: list[tuple[int, mx.array]] = []  # drafts kept (in the KV cache), not yet handed out
        self._pending_drawn_ahead = False  # the pending token was drawn by a verify pass (not yet `_skip_draw`n)
        self._tokens_left = max_tokens  # tokens still to hand out, when bounded
        self.drafted = 0  # draft tokens fed
        self.accepted = 0  # of those, handed out (kept drafts a row never hands out count as dropped)

    def next_token(self, more: bool) -> int:
        """The next token. With `more`, the one after it starts computing before this one is waited for
        (the GPU never idles on Python); without, nothing more is fed and the cache ends before this token."""
        self.prefilled = 0
        if self._tokens_left is not None:
            self._tokens_left -= 1
        if self._ready:
            return self._next_ready(more)
        if self._pending is None:
            self.prefilled = len(self._rest)
            self._pending = self._prefill()
        token, self.logprobs = self._pending
        self._pending = None
        if self._pending_drawn_ahead:
            self._skip_draw()
            self._pending_drawn_ahead = False
        if more and self._drafts is not None:
            if self._undrafted <= 0 and self._drafts.draft(1):
                return self._next_speculating(token)
            self._undrafted -= 1
        if more:
            self._pending = self._feed(token)
            _async_eval(*self._pending)
        timeline.mark_launched()  # benchmark timeline: a no-op unless on (mlx_backend/timeline.py)
        value = token.item()
        assert isinstance(value, int)
        if more:
            self.tokens_in_cache.append(value)
            if self._drafts is not None:
                self._drafts.extend([value])
        return value

    def _next_speculating(self, token: mx.array) -> int:
        """`token`, read first (drafts follow it): the text so far ends in an n-gram seen before, so a draft is
        likely. A step that finds none feeds `token` alone, having waited for it (the cost of looking)."""
        assert self._drafts is not None
        value = token.item()
        assert isinstance(value, int)
        self.tokens_in_cache.append(value)
        self._drafts.extend([value])
        # kept drafts and the token drawn after them all count against the budget
        limit = self._draft_limit if self._tokens_left is None else min(self._draft_limit, self._tokens_left - 1)
        drafts = self._drafts.draft(limit)
        if drafts:
            self._verify(value, drafts)
        else:
            self._pending = self._feed(token)
            _async_eval(*self._pending)
        timeline.mark_launched()
        return value

    def _verify(self, value: int, drafts: list[int]) -> None:
        """Feed `value` and `drafts` in one pass; keep the drafts up to the first the sampler does not draw
        (they wait in `_ready`), and set the token drawn after the last one kept computing."""
        logits = self.model(mx.array([value, *drafts])[None], cache=self.prompt_cache)[0]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        # the token after each position, drawn as a pass of one would draw it (a seeded sampler, with its keys)
        seeded = self.sampler if isinstance(self.sampler, SeededSampler) else None
        drawn = seeded.draws_ahead(logprobs) if seeded is not None else self.sampler(logprobs)
        mx.eval(drawn, logprobs)
        draws = cast(list[int], drawn.tolist())
        kept = 0
        while kept < len(drafts) and draws[kept] == drafts[kept]:
            kept += 1
        self._trim(len(drafts) - kept)
        self.drafted += len(drafts)
        if kept == len(drafts):
            self._draft_limit = min(self._max_draft_tokens, self._draft_limit + 2)
        else:
            self._draft_limit = max(1, self._draft_limit - 1 if kept else self._draft_limit // 2)
        if kept:
            self._backoff = 1
        else:
            self._undrafted, self._backoff = self._backoff, min(MAX_BACKOFF, 2 * self._backoff)
        self._ready = [(drafts[i], logprobs[i]) for i in range(kept)]  # drafts[i] was drawn after position i
        self.tokens_in_cache.extend(drafts[:kept])
        assert self._drafts is not None
        self._drafts.extend(drafts[:kept])
        self._pending = (drawn[kept:kept + 1], logprobs[kept])
        self._pending_drawn_ahead = True

    def _next_ready(self, more: bool) -> int:
        """A kept draft, already in the cache. Without `more`, the cache ends before it (the row leaves solo, or
        its budget ends): it and what followed it are trimmed off."""
        value, self.logprobs = self._ready.pop(0)
        self._skip_draw()
        self.accepted += 1
        if not more:
            after = 1 + len(self._ready)
            self._trim(after)
            del self.tokens_in_cache[-after:]
            self._ready, self._pending, self._pending_drawn_ahead = [], None, False
        return value

    def _skip_draw(self) -> None:
        """A token a verify pass drew is handed out: a seeded sampler moves past its key, as one token a pass
        would have used it (keys of tokens never handed out stay unused: the batch may go on drawing)."""
        if isinstance(self.sampler, SeededSampler):
            self.sampler.skip(1)

    def _trim(self, tokens: int) -> None:
        trimmed = _trim(self.prompt_cache, tokens)
        if trimmed != tokens:  # the batcher drafts only on caches that drop any number of tokens
            raise RuntimeError(f"the KV cache dropped {trimmed} of {tokens} rejected draft tokens")

    def _prefill(self) -> tuple[mx.array, mx.array]:
        rest = self._rest
        self._rest = []
        if not rest:
            raise ValueError("a solo generation needs at least one prompt token to feed")
        if len(rest) <= self._one_pass_tokens:
            first = self._feed(mx.array(rest))
            self.tokens_in_cache.extend(rest)
            _async_eval(*first)
            self._on_prefill_chunk()
            return first
        head = rest[:-1]
        prefill(self.model, head, self.prompt_cache, self._pacer, self._on_prefill_chunk)
        if self._context is not None and head:
            self._context.update_and_fetch(mx.array(head))
        self.tokens_in_cache.extend(head)
        first = self._feed(mx.array(rest[-1:]))
        self.tokens_in_cache.append(rest[-1])
        _async_eval(*first)
        return first

    def _feed(self, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """Run `tokens` (1-D) after the cache; the next token and its logprobs, lazily. Logits processors
        see every token so far, prompt included, as BatchGenerator shows them (grammars alone: `tokens`)."""
        logits = self.model(tokens[None], cache=self.prompt_cache)[:, -1, :]
        if self.logits_processors:
            context = tokens if self._context is None else self._context.update_and_fetch(tokens)
            for processor in self.logits_processors:
                logits = processor(context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs), logprobs[0]
