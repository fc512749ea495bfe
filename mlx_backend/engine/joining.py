"""A new row's first token comes from the batch's next step, not from a forward pass of its own.

mlx-lm 0.32.2's BatchGenerator (pinned) prefills a prompt but its last token, then, when the row moves to
decoding, runs one more forward pass over the moving rows alone (`PromptProcessingBatch.generate`, whose
`GenerationBatch` steps once as it is made) to feed that last token and sample the first token. On a GPU a
small model's step costs about the same for one row as for sixty-four (it is kernel launches), so that pass
cost every running row a step: each join took two passes, the prompt and the first token.

Here the moving rows join the generation batch with their last prompt token as the token they feed, and the
batch's next step feeds it beside the running rows' tokens: one pass per join (the prompt's). The order of a
generator step becomes: queued requests enter the prompt batch, rows whose prompt is in but its last token
join the generation batch, the generation step runs (running and joining rows), then the next prompt pieces.
A joining row's first token is sampled in the same step as before, and handed out one step later as before
(one token in flight); the step that feeds its prompt token gives no response for it, and counts nothing
against its max_tokens or stop sequences (`JoiningBatch.next`).

The batch's step is mlx-lm's, but for the logprobs: the batch's are evaluated as one array and each row's are
sliced from it only when read (a request that asked for logprobs), where mlx-lm evaluates one slice per row
every step (`JoiningBatch._step`, `logprobs.RowOf`).

`join_in_step(generator)` puts this on one BatchGenerator (the engine's, as the batcher makes it); others,
such as the benchmarks' stock generator, stay mlx-lm's. It reads mlx-lm 0.32.2's internals (pinned:
tests/unit/mlx_backend/engine/test_joining.py fails when the version moves). The generator's counters count a
joining row's first step as decode time, where mlx-lm's first-token pass was counted nowhere.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch, PromptProcessingBatch

from mlx_backend.engine.logprobs import RowOf

__all__ = ["JoiningBatch", "join_in_step"]

_async_eval: Callable[..., None] = mx.async_eval  # untyped in mlx
_CLEAR_CACHE_EVERY = 512  # generation steps between emptying MLX's buffer cache, as mlx-lm's generator does
_NO_LOGPROBS = mx.zeros((1,))  # a joining row's place in the logprobs of the step before it joined


class JoiningBatch(GenerationBatch):
    """mlx-lm's generation batch, whose rows may be joining: fed their last prompt token in the next step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._making = True  # mlx-lm's constructor steps a batch that has rows: a joining batch waits
        super().__init__(*args, **kwargs)
        self._making = False
        # Entered around the next step, with every row in it (the joining ones too): the batcher's plan of
        # the step's grammar masks (batcher.constrained_step); None: a plain step.
        self.around_step: Callable[[], contextlib.AbstractContextManager[None]] | None = None
        self._joining = [True] * len(self.uids)
        self._next_logprobs = [_NO_LOGPROBS] * len(self.uids)  # nothing was sampled before the prompt token

    @classmethod
    def moving(cls, prompts: PromptProcessingBatch, last_tokens: list[int]) -> JoiningBatch:
        """The rows of `prompts` (their caches hold all of each prompt but `last_tokens`), about to join."""
        # uint32, as sampled tokens are: the batch's tokens stay one type when the two are concatenated
        return cls(prompts.model, prompts.uids, mx.array(last_tokens, dtype=mx.uint32), prompts.prompt_cache,
                   prompts.tokens, prompts.samplers, prompts.fallback_sampler, prompts.logits_processors,
                   prompts.stop_sequences, prompts.max_tokens)

    def _step(self) -> tuple[list[int], list[Any]]:
        """mlx-lm's step (the forward pass, the rows' processors, normalized logprobs, the samplers; the next
        step launched before the tokens fed in this one are read), with one difference: the batch's logprobs
        are evaluated as one array, and a row's are a `RowOf` it, sliced only if a request reads them. mlx-lm
        evaluates a slice per row every step, which costs host time per row where the step is host-bound
        (`bench_step_split.py`)."""
        if self._making:
            return [], []
        batch: Any = self  # mlx-lm's attributes are typed as their initial values (None, or Optional lists)
        fed, fed_logprobs = batch._next_tokens, batch._next_logprobs
        batch._current_tokens, batch._current_logprobs = fed, fed_logprobs
        logits = self.model(fed[:, None], cache=self.prompt_cache)[:, -1, :]
        contexts: list[mx.array] = []
        processors_by_row: list[Any] = self.logits_processors or []
        if any(processors_by_row):
            rows = []
            for i, processors in enumerate(processors_by_row):
                row = logits[i : i + 1]
                if processors:
                    context = batch._token_context[i].update_and_fetch(fed[i : i + 1])
                    contexts.append(context)
                    for processor in processors:
                        row = processor(context, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        batch._next_tokens = self._sample(logprobs)
        batch._next_logprobs = [RowOf(logprobs, i) for i in range(len(self.uids))]  # sliced when read
        _async_eval(batch._next_tokens, logprobs, contexts)
        tokens: list[int] = fed.tolist()  # waits for the step before this one
        for kept, token in zip(self.tokens, tokens, strict=False):
            kept.append(token)
        return tokens, fed_logprobs

    def _sample(self, logprobs: mx.array) -> mx.array:
        """One call for the whole batch when every row has the same sampler, else one per row."""
        chosen: list[Any] = self.samplers or [None] * len(self.uids)
        samplers = [self.fallback_sampler if s is None else s for s in chosen]
        if all(s is samplers[0] for s in samplers):
            return (samplers[0] if samplers else self.fallback_sampler)(logprobs)
        return mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(samplers)], axis=0)

    def extend(self, batch: Any) -> None:
        joining = batch._joining if isinstance(batch, JoiningBatch) else [False] * len(batch.uids)
        super().extend(batch)  # type: ignore[no-untyped-call]
        self._joining.extend(joining)

    def filter(self, keep: list[int]) -> None:
        super().filter(keep)
        self._joining = [self._joining[i] for i in keep]

    def next(self) -> list[Any]:
        """One step: the token each running row fed (sampled the step before) as its response, with the
        finish reason mlx-lm gives it; a joining row feeds its prompt's last token and answers nothing."""
        if not self.uids:
            return []
        joining, self._joining = self._joining, [False] * len(self.uids)
        with self.around_step() if self.around_step is not None else contextlib.nullcontext():
            tokens, logprobs = self._step()
        keep: list[int] = []
        responses = []
        for i, uid in enumerate(self.uids):
            if joining[i]:
                keep.append(i)
                continue
            self._num_tokens[i] += 1
            reason = "length" if self._num_tokens[i] >= self.max_tokens[i] else None
            if self._matchers[i].advance(tokens[i]):
                reason = "stop"
            ended = reason is not None
            responses.append(self.Response(uid=uid, token=tokens[i], logprobs=logprobs[i], finish_reason=reason,
                                           prompt_cache=self.extract_cache(i) if ended else None,
                                           all_tokens=self.tokens[i] if ended else None))
            if not ended:
                keep.append(i)
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses


def _next(generator: Any) -> tuple[list[Any], list[Any]]:
    """One generator step (BatchGenerator._next's place), with joining rows fed in the generation step."""
    prompts: Any = generator._prompt_batch  # PromptProcessingBatch (untyped)
    decoding: JoiningBatch = generator._generation_batch
    processing: list[Any] = generator._currently_processing  # per prompt row: [segments, done, total]
    counters = generator._counters
    prompt_responses: list[Any] = []

    # A generator whose decoding rows fill it takes no prompts in. mlx-lm decides after its step (finished rows
    # gone), this before it: queued rows wait one step longer at capacity. The engine never gets there (the
    # batcher starts rows only up to max_running, the generator's completion_batch_size).
    full = len(decoding) >= generator.completion_batch_size
    room = min(generator.prefill_batch_size - len(prompts), generator.completion_batch_size - len(decoding),
               len(generator._unprocessed_sequences))
    if not full and room > 0:
        prompts.extend(generator._make_batch(room))

    moving = [] if full else [i for i, row in enumerate(processing) if len(row[0]) == 1 and len(row[0][0]) == 1]
    if moving:
        last_tokens = [processing[i][0][0][0] for i in moving]
        for i in moving:
            total = processing[i][2]
            prompt_responses.append(PromptProcessingBatch.Response(prompts.uids[i], (total, total), True, True))
        generator._currently_processing = processing = [p for i, p in enumerate(processing) if i not in moving]
        decoding.extend(JoiningBatch.moving(prompts.split(moving), last_tokens))

    responses: list[Any] = []
    if len(decoding) > 0:
        began = time.perf_counter()
        responses = decoding.next()
        counters.decode_time += time.perf_counter() - began
        counters.generation_tokens += len(responses)
        counters.generation_steps += 1
        if counters.generation_steps % _CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
    if len(decoding) >= generator.completion_batch_size:
        return prompt_responses, responses

    pieces: list[list[int]] = []
    for i, row in enumerate(processing):
        segments = row[0]
        piece = segments[0][:generator.prefill_step_size]
        segments[0] = segments[0][len(piece):]
        ended_segment = not segments[0]
        if ended_segment:
            segments.pop(0)
        row[1] += len(piece)
        pieces.append(piece)
        prompt_responses.append(PromptProcessingBatch.Response(prompts.uids[i], (row[1], row[2]), ended_segment,
                                                               False))
    if pieces:
        counters.prompt_tokens += sum(len(p) for p in pieces)
        began = time.perf_counter()
        prompts.prompt(pieces)
        counters.prompt_time += time.perf_counter() - began
    return prompt_responses, responses


def join_in_step(generator: Any) -> None:
    """Rows of `generator` (a BatchGenerator with no requests yet) join its generation step from now on."""
    stock = generator._generation_batch
    if stock.uids or generator._prompt_batch.uids or generator._unprocessed_sequences:
        raise ValueError("join_in_step needs a generator with no requests yet")
    generator._generation_batch = JoiningBatch.empty(stock.model, stock.fallback_sampler)
    generator._next = types.MethodType(_next, generator)
