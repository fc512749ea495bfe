"""The MLX thread's work: continuous batching with mlx-lm's BatchGenerator, one generator per loaded model.

Every `mx` call of the engine happens on the one thread that calls `submit`, `abort` and `step`. Requests
join and leave the batch at any step; each has its own sampler, penalties, token budget, stop strings and
streaming detokenizer. A request that finds its model idle runs solo (see mlx_backend.solo) and joins the
batch when a second one arrives. A prefix (KV) cache per model lets a multi-turn chat skip the prefill of
the turns it shares with an earlier request. The heartbeat thread only reads plain values published after
each step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from mlx_backend.cache import CachedModel, ModelCache
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.sampling import make_logits_processors, make_sampler
from mlx_backend.solo import SoloGeneration
from mlx_backend.stops import StopMatcher
from mlx_backend.types import (
    Delta,
    EngineConfig,
    Event,
    Failed,
    Finished,
    Generate,
    Heartbeat,
    Loading,
    Started,
)

log = logging.getLogger("mlx_gateway.engine.batcher")

_PREFIX_KEY = "model"  # one LRUPromptCache per loaded model, so one key is enough
_PREFILL_BATCH = 8  # prompts prefilled together in one step
_SLOW_STEP_S = 0.05  # test-only fault "slow": one step per 50 ms
_SOLO_UID = -1  # BatchGenerator's uids start at 0: a request running solo is keyed by this until it joins


# mlx-lm has no type hints: its objects are held as Any.
@dataclass
class _Request:
    command: Generate
    uid: int
    prompt_tokens: int
    cached_tokens: int
    detokenizer: Any  # StreamingDetokenizer, one per request
    stops: StopMatcher
    max_tokens: int
    solo: SoloGeneration | None = None  # set while the request runs alone, outside the batch
    completion_tokens: int = 0
    unsent_tokens: int = 0  # generated but not yet reported in a Delta

    @property
    def rid(self) -> str:
        return self.command.request_id

    @property
    def next_is_last(self) -> bool:
        """Whether the next token uses up the token budget."""
        return self.completion_tokens + 1 >= self.max_tokens


@dataclass
class _Token:
    """One generated token, shaped like BatchGenerator's Response where `_on_token` reads it."""

    token: int
    finish_reason: str | None
    prompt_cache: list[Any] | None = None  # set when finished: the KV cache to keep for the next turn
    all_tokens: list[int] | None = None  # the tokens that cache holds


@dataclass
class _ModelState:
    cached: CachedModel
    generator: Any  # BatchGenerator
    prefix: LRUPromptCache
    requests: dict[int, _Request] = field(default_factory=dict)  # BatchGenerator uid (or _SOLO_UID) -> request

    @property
    def solo_request(self) -> _Request | None:
        return self.requests.get(_SOLO_UID)


class Batcher:
    def __init__(self, config: EngineConfig, cache: ModelCache, emit: Callable[[Event], None]) -> None:
        self.config = config
        self.cache = cache
        self._emit = emit
        self._waiting: deque[Generate] = deque()
        self._states: dict[str, _ModelState] = {}
        self._where: dict[str, tuple[_ModelState, int]] = {}  # request id -> (model state, uid)
        # Published for the heartbeat thread: plain values, replaced (never mutated) by the MLX thread.
        self.progress = 0
        self.active_memory_bytes = 0
        self.prompt_cache_bytes = 0
        self._running_by_model: dict[str, int] = {}
        self._reported_changes = 0
        self._told_loading: set[str] = set()  # waiting requests already sent Loading
        self._encoded: tuple[str, list[int]] | None = None  # the prompt of a request waiting for memory
        cache.on_evict = self._drop_model
        cache.trim_prefix = self._trim_prefix

    # -- commands (MLX thread) ---------------------------------------------------------------------------

    def submit(self, command: Generate) -> None:
        rid = command.request_id
        if rid in self._where or any(c.request_id == rid for c in self._waiting):
            log.warning("request id %s is already in flight; refusing the duplicate", rid)
            self._emit(Failed(rid, EngineErrorCode.INTERNAL.value, "Duplicate request id."))
            return
        self._waiting.append(command)

    def abort(self, request_id: str) -> None:
        for command in self._waiting:
            if command.request_id == request_id:
                self._waiting.remove(command)
                self._left_waiting(request_id)
                self._emit(Finished(request_id, "abort", 0, 0, 0))
                return
        where = self._where.get(request_id)
        if where is not None:
            state, uid = where
            if uid != _SOLO_UID:
                state.generator.remove([uid])
            self._finish(state, state.requests[uid], "abort")
            self._publish()

    def has_work(self) -> bool:
        return bool(self._waiting) or bool(self._where) or self.cache.has_load_work

    def idle_timeout(self) -> float | None:
        """How long the MLX thread may wait for a command: 0 while requests decode or a load has MLX work,
        else until the next keep-alive runs out (None: forever)."""
        if self._where:
            return 0.0
        return self.cache.seconds_until_due(self.busy_models())

    def step(self) -> None:
        """Admit waiting requests while there is room, then one step (decode + a prefill chunk) per model."""
        started = time.monotonic()
        self._admit()
        for state in list(self._states.values()):
            if state.requests:
                self._step_model(state)
        self._publish()
        if self.config.allow_fault_injection and self._has_slow_request():
            # Test-only "slow": pace the whole batch at ~20 steps/s so tests can act mid-stream.
            time.sleep(max(0.0, _SLOW_STEP_S - (time.monotonic() - started)))

    def shutdown(self) -> None:
        """End everything with finish_reason "abort" and free every model."""
        while self._waiting:
            self._emit(Finished(self._waiting.popleft().request_id, "abort", 0, 0, 0))
        for state in list(self._states.values()):
            for request in list(state.requests.values()):
                self._finish(state, request, "abort")
        self.cache.clear()  # calls _drop_model for each model
        self._states.clear()
        mx.clear_cache()
        self._publish()

    def fail_all(self, message: str) -> None:
        """Last resort after an unexpected error outside any one request: end every running request."""
        for state in list(self._states.values()):
            for request in list(state.requests.values()):
                self._fail(state, request, EngineError(EngineErrorCode.INTERNAL, message))
            self._drop_model(state.cached.id)
        self._publish()

    # -- heartbeat (any thread) --------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(self._running_by_model.values())

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def heartbeat(self) -> Heartbeat:
        loaded, failed = self.cache.snapshot(self._running_by_model)
        load, queued = self.cache.load_progress()
        ledger = self.cache.ledger
        return Heartbeat(
            progress=self.progress, running=self.running, waiting=self.waiting, loading=self.cache.loading,
            loaded=loaded, failed=failed, memory_budget_bytes=self.cache.budget,
            active_memory_bytes=self.active_memory_bytes, prompt_cache_bytes=self.prompt_cache_bytes,
            load=load, queued_loads=queued, weights_bytes=ledger.weights_bytes + ledger.loading,
            kv_bytes=ledger.kv_bytes(),
        )

    def _has_slow_request(self) -> bool:
        return any(r.command.fault == "slow" for s in self._states.values() for r in s.requests.values())

    def _heartbeat_if_changed(self) -> None:
        """An extra heartbeat when models were loaded, evicted or failed, so the gateway's view is fresh
        by the time the request that caused it gets its answer."""
        if self.cache.changes != self._reported_changes:
            self._reported_changes = self.cache.changes
            self._publish()
            self._emit(self.heartbeat())

    def _publish(self) -> None:
        self._running_by_model = {m: len(s.requests) for m, s in self._states.items() if s.requests}
        self._measure_prefix()
        self.active_memory_bytes = mx.get_active_memory()

    # -- admission ---------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Start waiting requests whose model is loaded while there is room, in order; a request whose model
        is loading stays waiting and lets later ones pass; one that waits for memory holds the later ones
        back (first come, first served). Between two passes, the model load in progress gets its piece, so a
        request whose load ends in this step starts in this step."""
        busy = self.busy_models()
        changes = self.cache.changes
        self._start_waiting(busy)
        if self.cache.advance(busy, idle=not self._where):
            self.progress += 1
        if self.cache.changes != changes:
            self._heartbeat_if_changed()
            self._start_waiting(busy)

    def _start_waiting(self, busy: set[str]) -> None:
        for command in list(self._waiting):
            if len(self._where) >= self.config.max_running:
                break
            try:
                cached = self.cache.acquire(command.model, busy, waiter=command.request_id)
                if cached is None:
                    if command.request_id not in self._told_loading:
                        self._told_loading.add(command.request_id)
                        self._emit(Loading(command.request_id, command.model))
                    continue
                self._heartbeat_if_changed()  # a reload or an eviction just happened: the gateway hears first
                if not self._start(command, cached):
                    break
            except EngineError as exc:
                self._heartbeat_if_changed()  # the gateway's model list shows the failure with the error
                self._emit(Failed(command.request_id, exc.code.value, exc.message, exc.param))
            except Exception as exc:
                log.exception("request %s failed to start", command.request_id)
                self._emit(Failed(command.request_id, EngineErrorCode.INTERNAL.value, _internal(exc)))
            self._waiting.remove(command)
            self._left_waiting(command.request_id)
            busy.add(command.model)
            self._publish()

    def _left_waiting(self, request_id: str) -> None:
        self._told_loading.discard(request_id)
        self.cache.forget_waiter(request_id)
        if self._encoded is not None and self._encoded[0] == request_id:
            self._encoded = None

    def busy_models(self) -> set[str]:
        """Models with requests in flight: never evicted, unloaded or reloaded under them."""
        return {m for m, s in self._states.items() if s.requests}

    def _trim_prefix(self, n_bytes: int) -> None:
        """Free about `n_bytes` of prefix cache (the memory budget needs them), the least recently used
        model's first."""
        for state in sorted(self._states.values(), key=lambda s: s.cached.last_used):
            if n_bytes <= 0:
                break
            before = state.prefix.nbytes
            state.prefix.trim_to(n_bytes=max(0, before - n_bytes))
            n_bytes -= before - state.prefix.nbytes
        self._measure_prefix()

    def _measure_prefix(self) -> None:
        self.prompt_cache_bytes = sum(s.prefix.nbytes for s in self._states.values())
        self.cache.ledger.prefix_bytes = self.prompt_cache_bytes

    def _start(self, command: Generate, cached: CachedModel) -> bool:
        """Start a request on its loaded model; False when its KV cache does not fit yet (it stays waiting)."""
        if command.fault and self.config.allow_fault_injection:
            _inject_early_fault(command.fault)
        state = self._state_for(cached)
        tokenizer: Any = cached.artifacts.tokenizer
        param = "messages" if command.messages is not None else "prompt"
        if self._encoded is not None and self._encoded[0] == command.request_id:
            tokens = self._encoded[1]
        else:
            tokens = _encode(command, tokenizer)
        context = cached.artifacts.context_length
        if context is not None and len(tokens) >= context:
            raise EngineError(
                EngineErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {context} tokens, but the {param} has {len(tokens)} "
                "tokens, leaving no room for a completion. Shorten the input.",
                param,
            )
        # A request may not run past the context: max_tokens is clamped to what is left after the prompt
        # (the request then ends with "length" there) rather than refused, as OpenAI-compatible servers do.
        max_tokens = max(1, command.params.max_tokens)
        if context is not None:
            max_tokens = min(max_tokens, context - len(tokens))
        if not self.cache.reserve_kv(command.request_id, cached.id, len(tokens) + max_tokens, self.busy_models()):
            self._encoded = (command.request_id, tokens)  # not tokenized again while it waits
            return False
        try:
            self._begin(command, cached, state, tokens, max_tokens)
        except BaseException:
            self.cache.release_kv(command.request_id)
            raise
        return True

    def _begin(self, command: Generate, cached: CachedModel, state: _ModelState, tokens: list[int],
               max_tokens: int) -> None:
        tokenizer: Any = cached.artifacts.tokenizer
        prompt_cache, rest = state.prefix.fetch_nearest_cache(_PREFIX_KEY, tokens)
        if prompt_cache is not None and not rest:
            # An exact hit still needs one token to feed the model: step the cache back by one.
            if can_trim_prompt_cache(prompt_cache):
                trim_prompt_cache(prompt_cache, 1)
                rest = tokens[-1:]
            else:
                prompt_cache, rest = None, tokens
        cached_tokens = len(tokens) - len(rest)
        sampler = make_sampler(command.params)
        processors = make_logits_processors(command.params, len(tokens))
        request = _Request(command, _SOLO_UID, len(tokens), cached_tokens, tokenizer.detokenizer,
                           StopMatcher(command.params.stop), max_tokens)
        solo = state.solo_request
        if solo is not None:
            self._join_batch(state, solo)
        if not state.requests and not self._more_waiting_for(command.model, command):
            request.solo = SoloGeneration(cached.artifacts.model, tokens, prompt_cache, cached_tokens, sampler,
                                          processors, self.config.prefill_step_size, self._made_progress)
        else:
            (request.uid,) = state.generator.insert(
                [rest],
                max_tokens=[max_tokens],
                caches=[prompt_cache],  # None: a fresh cache
                all_tokens=[tokens[:cached_tokens]],
                samplers=[sampler],
                logits_processors=[processors],
            )
        state.requests[request.uid] = request
        self._where[command.request_id] = (state, request.uid)
        self._emit(Started(command.request_id, len(tokens), cached_tokens))

    def _made_progress(self) -> None:
        self.progress += 1

    def _more_waiting_for(self, model: str, starting: Generate) -> bool:
        """Whether another waiting request (not the one being started) wants the same model."""
        return any(c.model == model and c is not starting for c in self._waiting)

    def _join_batch(self, state: _ModelState, request: _Request) -> None:
        """Move the solo request into the batch: hand out the token it has in flight, then insert it with its
        KV cache and that token as its one-token "prompt", so nothing is recomputed or lost."""
        solo = request.solo
        assert solo is not None
        try:
            last = self._solo_token(state, request, more=False)
            self._on_token(state, request, last)
            if request.rid not in self._where:
                return  # that token ended it
            (uid,) = state.generator.insert(
                [[last.token]],
                max_tokens=[request.max_tokens - request.completion_tokens],
                caches=[solo.prompt_cache],
                all_tokens=[solo.tokens_in_cache],
                samplers=[solo.sampler],
                logits_processors=[solo.logits_processors],
            )
        except Exception as exc:  # its failure is its own, not the arriving request's
            log.exception("request %s failed while joining the batch from solo", request.rid)
            self._fail(state, request, EngineError(EngineErrorCode.INTERNAL, _internal(exc)))
            return
        del state.requests[_SOLO_UID]
        request.uid, request.solo = uid, None
        state.requests[uid] = request
        self._where[request.rid] = (state, uid)

    def _state_for(self, cached: CachedModel) -> _ModelState:
        state = self._states.get(cached.id)
        if state is not None and state.cached is cached:
            return state
        if state is not None:  # reloaded under us (files changed): start over with the new weights
            self._drop_model(cached.id)
        tokenizer = cached.artifacts.tokenizer
        generator = BatchGenerator(
            cached.artifacts.model,
            stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
            completion_batch_size=self.config.max_running,
            prefill_batch_size=min(_PREFILL_BATCH, self.config.max_running),
            prefill_step_size=self.config.prefill_step_size,
        )
        prefix = LRUPromptCache(max_size=256, max_bytes=self.config.prompt_cache_bytes)
        state = _ModelState(cached, generator, prefix)
        self._states[cached.id] = state
        return state

    def _drop_model(self, model_id: str) -> None:
        """Let go of a model's generator and prefix cache (the cache is evicting or reloading it)."""
        state = self._states.pop(model_id, None)
        if state is None:
            return
        for request in list(state.requests.values()):
            self._fail(state, request, EngineError(EngineErrorCode.INTERNAL, "The model was unloaded."))
        state.generator.close()
        self._measure_prefix()

    # -- decoding ----------------------------------------------------------------------------------------

    def _step_model(self, state: _ModelState) -> None:
        solo = state.solo_request
        if solo is not None:
            self._step_solo(state, solo)
            return
        try:
            _, responses = state.generator.next()
        except Exception as exc:
            # The generator's state is unknown after a failed step: end its requests and start it over.
            log.exception("a batch step of model %s failed", state.cached.id)
            for request in list(state.requests.values()):
                self._fail(state, request, EngineError(EngineErrorCode.INTERNAL, _internal(exc)))
            self._states.pop(state.cached.id, None)
            state.generator.close()
            return
        finally:
            self.progress += 1
        for response in responses:
            active = state.requests.get(response.uid)
            if active is None:
                continue
            try:
                self._on_token(state, active, response)
            except Exception as exc:
                log.exception("request %s failed during decoding", active.rid)
                state.generator.remove([active.uid])
                self._fail(state, active, EngineError(EngineErrorCode.INTERNAL, _internal(exc)))

    def _step_solo(self, state: _ModelState, request: _Request) -> None:
        try:
            token = self._solo_token(state, request, more=not request.next_is_last)
            self._on_token(state, request, token)
        except Exception as exc:
            log.exception("request %s failed while decoding alone", request.rid)
            self._fail(state, request, EngineError(EngineErrorCode.INTERNAL, _internal(exc)))
        finally:
            self.progress += 1

    def _solo_token(self, state: _ModelState, request: _Request, more: bool) -> _Token:
        """The solo request's next token, with the finish reason BatchGenerator would give it."""
        solo = request.solo
        assert solo is not None
        token = solo.next_token(more)
        if token in state.cached.artifacts.tokenizer.eos_token_ids:
            reason: str | None = "stop"
        elif request.next_is_last:
            reason = "length"
        else:
            return _Token(token, None)
        return _Token(token, reason, solo.prompt_cache, solo.tokens_in_cache)

    def _on_token(self, state: _ModelState, request: _Request, response: _Token | Any) -> None:
        """One generated token of one request: a GenerationBatch.Response, or a _Token from the solo path."""
        if request.command.fault == "raise" and self.config.allow_fault_injection:
            raise RuntimeError("injected fault (raise)")
        request.completion_tokens += 1
        request.unsent_tokens += 1
        detokenizer = request.detokenizer
        if response.finish_reason == "stop":  # an EOS token: ends the text, is not part of it
            detokenizer.finalize()
        else:
            detokenizer.add_token(response.token)
            if response.finish_reason is not None:
                detokenizer.finalize()
        text, hit_stop = request.stops.feed(detokenizer.last_segment)
        if hit_stop:
            if response.finish_reason is None and request.solo is not None:
                self._save_prefix(state, request.solo.prompt_cache, request.solo.tokens_in_cache)
            elif response.finish_reason is None:  # the generator would go on: take it out now
                saved = state.generator.remove([request.uid], return_prompt_caches=True)
                if request.uid in saved:
                    self._save_prefix(state, *saved[request.uid])
            else:
                self._save_prefix(state, response.prompt_cache, response.all_tokens)
            self._finish(state, request, "stop", text)
        elif response.finish_reason is not None:
            self._save_prefix(state, response.prompt_cache, response.all_tokens)
            self._finish(state, request, response.finish_reason, text + request.stops.flush())
        elif text:
            self._emit(Delta(request.rid, text, request.unsent_tokens))
            request.unsent_tokens = 0

    def _save_prefix(
        self, state: _ModelState, prompt_cache: list[Any] | None, tokens: list[int] | None
    ) -> None:
        """Keep a finished request's KV cache, keyed by every token in it, for the next turn to reuse."""
        if not prompt_cache or not tokens or self.config.prompt_cache_bytes <= 0:
            return
        mx.eval([c.state for c in prompt_cache])  # detach it from the batch's arrays now
        state.prefix.insert_cache(_PREFIX_KEY, list(tokens), prompt_cache)
        # One budget for all models: trim the other models' caches first, then this one's.
        over = sum(s.prefix.nbytes for s in self._states.values()) - self.config.prompt_cache_bytes
        for other in sorted(self._states.values(), key=lambda s: s is state):
            if over <= 0:
                break
            before = other.prefix.nbytes
            other.prefix.trim_to(n_bytes=max(0, before - over))
            over -= before - other.prefix.nbytes

    # -- endings -----------------------------------------------------------------------------------------

    def _finish(self, state: _ModelState, request: _Request, reason: str, text: str = "") -> None:
        self._forget(state, request)
        if reason != "abort" and (text or request.unsent_tokens):
            self._emit(Delta(request.rid, text, request.unsent_tokens))
        self._emit(Finished(request.rid, reason, request.prompt_tokens, request.completion_tokens,
                            request.cached_tokens))

    def _fail(self, state: _ModelState, request: _Request, error: EngineError) -> None:
        self._forget(state, request)
        self._emit(Failed(request.rid, error.code.value, error.message, error.param))

    def _forget(self, state: _ModelState, request: _Request) -> None:
        state.requests.pop(request.uid, None)
        self._where.pop(request.rid, None)
        self.cache.release_kv(request.rid)
        self.cache.touch(state.cached.id)


def _encode(command: Generate, tokenizer: Any) -> list[int]:
    """Prompt token ids: chat messages through the model's template, a legacy prompt as is."""
    param = "messages" if command.messages is not None else "prompt"
    if command.messages is not None:
        messages = [
            {"role": m.role, "content": m.content}
            | ({"name": m.name} if m.name is not None else {})
            | ({"tool_call_id": m.tool_call_id} if m.tool_call_id is not None else {})
            for m in command.messages
        ]
        if tokenizer.has_chat_template:
            try:
                tokens = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            except Exception as exc:
                raise EngineError(
                    EngineErrorCode.INVALID_REQUEST,
                    f"The model's chat template rejected the messages: {_short(exc)}", "messages",
                ) from exc
        else:
            # No template: a plain transcript the model can at least continue.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            tokens = list(tokenizer.encode(text))
    elif command.prompt is not None:
        tokens = list(tokenizer.encode(command.prompt))
    else:
        raise EngineError(EngineErrorCode.INVALID_REQUEST, "The request has neither messages nor a prompt.",
                          param)
    if not tokens:
        raise EngineError(EngineErrorCode.INVALID_REQUEST, f"The {param} is empty.", param)
    return tokens


def _inject_early_fault(fault: str) -> None:
    """Test-only faults that stand for native failures; honoured only with allow_fault_injection."""
    if fault == "abort":
        log.error("fault injection: aborting the engine process")
        os.abort()
    if fault == "stall":
        log.error("fault injection: the MLX thread stalls for good")
        threading.Event().wait()
    # "raise" happens later, inside the decode step (see _on_token); "slow" paces the steps (see step)


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _internal(exc: BaseException) -> str:
    return f"The engine failed while generating: {type(exc).__name__}: {_short(exc)}"

