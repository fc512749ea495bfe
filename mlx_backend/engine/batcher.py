"""The MLX thread's work: continuous batching with mlx-lm's BatchGenerator, one generator per loaded model.

Every `mx` call of the engine happens on the one thread that calls `submit`, `abort` and `step`. Requests
join and leave the batch at any step. A request is one row per choice (n), each with its own sampler,
logits processors and output bookkeeping (mlx_backend/engine/plan.py decides them, mlx_backend/engine/choice.py turns
tokens into events). A lone request runs solo (mlx_backend/engine/solo.py) and joins the batch when a second one
arrives; the n choices of one request share one prefill. Finished requests leave their KV cache for the
next turn (mlx_backend/engine/residency/prefix.py). The heartbeat thread only reads plain values published
after each step. What is kept per request, row and model is in mlx_backend/engine/rows.py; the queue of
requests not yet started, in mlx_backend/engine/waiting.py.

Models load in pieces between steps (mlx_backend/engine/residency/, model_load.py): a request whose model is
loading stays waiting while the others decode, and a request starts only once its KV cache fits the memory budget.
The batcher builds its `Residency` and is its `ResidencyEvents`: told when a model goes, it lets go of its
generator first.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

from mlx_backend import cpu_blas, timeline
from mlx_backend.contract import (
    EngineConfig,
    Event,
    Failed,
    Finished,
    Generate,
    Heartbeat,
    Loading,
    ModelEvent,
    Started,
)
from mlx_backend.engine import batch_cache, faults, joining, vision
from mlx_backend.engine.constrained import ConstraintFailed, ConstraintProcessor
from mlx_backend.engine.logprobs import TokenText
from mlx_backend.engine.lookup import DraftLookup
from mlx_backend.engine.masks import MaskedForward, plan_rows
from mlx_backend.engine.pacing import PrefillPacer
from mlx_backend.engine.plan import ChoicePlan, RequestPlan, plan_request
from mlx_backend.engine.residency.events import ResidencyEvents
from mlx_backend.engine.residency.models import CachedModel
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.engine.rows import SOLO_UID, ModelState, Request, Row, Token
from mlx_backend.engine.solo import SoloGeneration, prefill
from mlx_backend.engine.tools import prompt_tokens
from mlx_backend.engine.waiting import WaitingRequests
from mlx_backend.errors import EngineError, EngineErrorCode

log = logging.getLogger("mlx_gateway.engine.batcher")

# Prompts prefilled together in one pass, unless configured. Each pass stalls every running row once; on a GPU a
# burst of arrivals then takes fewer passes (measured equal to 8 within the noise on an H100, docs/benchmarks.md).
PREFILL_BATCH_CPU = 8
PREFILL_BATCH_GPU = 32

# On a GPU a lone request's uncached prompt up to this long is fed in one pass that also gives its first token
# (stream_generate's way): a pass costs about a step there, and the logits of 512 positions little.
SOLO_ONE_PASS_TOKENS_GPU = 512

# Waiting requests that share a prompt prefix this long (agents with one system prompt) have it prefilled once.
SHARED_PREFIX_MIN_TOKENS = 512

_TRIMMABLE_CACHES = (KVCache, QuantizedKVCache)  # trim any number of tokens at any length


class Batcher:
    def __init__(self, config: EngineConfig, residency: Callable[[ResidencyEvents], Residency],
                 emit: Callable[[Event], None]) -> None:
        """`residency` builds the batcher's Residency, given the events it sends (the batcher)."""
        gpu = mx.default_device().type == mx.gpu
        batch_cache.install(gpu=gpu)  # rows join and leave without device waits
        self.config = config
        self._prefill_batch = config.prefill_batch or (PREFILL_BATCH_GPU if gpu else PREFILL_BATCH_CPU)
        self._solo_one_pass_tokens = SOLO_ONE_PASS_TOKENS_GPU if gpu else 0
        self.max_draft_tokens = config.max_draft_tokens if drafting_pays(gpu) else 0
        self._emit = emit
        self._waiting = WaitingRequests()
        self._steps = 0
        self._states: dict[str, ModelState] = {}
        self._where: dict[str, tuple[ModelState, Request]] = {}  # request id -> where it runs
        self._waiting_tokens: dict[str, list[int]] = {}  # waiting request id -> its prompt, once tokenized
        # Published for the heartbeat thread: plain values, replaced (never mutated) by the MLX thread.
        self.progress = 0
        self.active_memory_bytes = 0
        self.prompt_cache_bytes = 0
        self._running_by_model: dict[str, int] = {}
        self._reported_changes = 0
        self.residency = residency(self)
        self._prefix = self.residency.prefix

    # -- what residency tells (ResidencyEvents) ----------------------------------------------------------

    def model_event(self, event: ModelEvent) -> None:
        self._emit(event)

    def model_dropped(self, model_id: str) -> None:
        self._drop_model(model_id)

    # -- commands (MLX thread) ---------------------------------------------------------------------------

    def submit(self, command: Generate) -> None:
        rid = command.request_id
        if rid in self._where or self._waiting.holds(rid):
            log.warning("request id %s is already in flight; refusing the duplicate", rid)
            self._emit(Failed(rid, EngineErrorCode.INTERNAL.value, "Duplicate request id."))
            return
        if not 1 <= command.n <= self.config.max_running:
            self._emit(Failed(rid, EngineErrorCode.INVALID_REQUEST.value, f"n must be between 1 and "
                              f"{self.config.max_running} (the batch size) on this server.", "n"))
            return
        if vision.has_images(command):  # a model that will not see them says so before it is loaded
            try:
                vision.refuse_images(command, self.residency.models.registry.resolve(command.model))
            except EngineError as exc:  # an unknown model is left to the cache, which says so as for any request
                if exc.code is EngineErrorCode.IMAGES_NOT_SUPPORTED:
                    self._emit(Failed(rid, exc.code.value, exc.message, exc.param))
                    return
        self._waiting.add(command, self._steps)

    def abort(self, request_id: str) -> None:
        command = self._waiting.find(request_id)
        if command is not None:
            self._leave_waiting(command)
            self._emit(Finished(request_id, "abort", 0, 0, 0))
            return
        where = self._where.get(request_id)
        if where is not None:
            state, request = where
            generated = sum(r.plan.output.completion_tokens for r in request.rows)
            self._take_out(state, request)
            # One Finished for the whole request: the gateway has let go of it and only counts its tokens.
            self._emit(Finished(request_id, "abort", request.prompt_tokens, generated, request.cached_tokens))
            self._publish()

    def has_work(self) -> bool:
        return bool(self._waiting) or bool(self._where) or self.residency.is_loading()

    def idle_timeout(self) -> float | None:
        """How long the MLX thread may wait for a command: 0 while requests decode or wait for anything but a
        load, else until the load or the next keep-alive needs it (None: forever)."""
        if self._where or any(not self.residency.is_loading(c.model) for c in self._waiting):
            return 0.0
        return self.residency.seconds_until_due(self.busy_models())

    def busy_models(self) -> set[str]:
        """Models with requests in flight: never evicted, unloaded or reloaded under them."""
        return {m for m, s in self._states.items() if s.rows}

    def step(self) -> None:
        """Admit waiting requests while there is room, then one step (decode + a prefill chunk) per model."""
        started = time.monotonic()
        self._steps += 1
        self._admit()
        for state in list(self._states.values()):
            if state.rows:
                self._step_model(state)
        self._publish()
        if self.config.allow_fault_injection and self._has_fault("slow"):
            faults.pace(started)

    def shutdown(self) -> None:
        """End everything with finish_reason "abort" and free every model."""
        self._waiting_tokens.clear()
        for command in self._waiting.take_all():
            self._emit(Finished(command.request_id, "abort", 0, 0, 0))
        for rid in list(self._where):
            self.abort(rid)
        self.residency.clear()  # calls model_dropped for each model
        self._states.clear()
        mx.clear_cache()
        self._publish()

    def fail_all(self, message: str) -> None:
        """Last resort after an unexpected error outside any one request: end every running request."""
        for state in list(self._states.values()):
            self._drop_model(state.cached.id, message)
        self._publish()

    # -- heartbeat (any thread) --------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(self._running_by_model.values())

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def heartbeat(self) -> Heartbeat:
        models = self.residency.report(self._running_by_model)
        return Heartbeat(
            progress=self.progress, running=self.running, waiting=self.waiting, loading=models.loading,
            loaded=models.loaded, failed=models.failed, memory_budget_bytes=models.memory_budget_bytes,
            active_memory_bytes=self.active_memory_bytes, prompt_cache_bytes=self.prompt_cache_bytes,
            load=models.load, queued_loads=models.queued_loads, weights_bytes=models.weights_bytes,
            kv_bytes=models.kv_bytes,
        )

    def digest(self) -> int:
        """What a group's ranks must agree on before each step (mlx_backend/engine/rank.py): the requests waiting and
        running, their prefix-cache hits and tokens so far, the models held. 31 bits, the same on every host."""
        parts = [c.request_id for c in self._waiting]
        for rid, (state, request) in sorted(self._where.items()):
            counts = ",".join(str(r.plan.output.completion_tokens) for r in request.rows if not r.ended)
            parts.append(f"{rid}@{state.cached.id}:{request.cached_tokens}:{counts}")
        parts.append(str(self.residency.weights_bytes))
        return zlib.crc32("|".join(parts).encode()) & 0x7FFF_FFFF

    def _has_fault(self, fault: str) -> bool:
        return any(request.command.fault == fault for _, request in self._where.values())

    def _heartbeat_if_changed(self) -> None:
        """An extra heartbeat when models were loaded, evicted or failed, so the gateway's view is fresh
        by the time the request that caused it gets its answer."""
        if self.residency.changes != self._reported_changes:
            self._reported_changes = self.residency.changes
            self._publish()
            self._emit(self.heartbeat())

    def _publish(self) -> None:
        self._running_by_model = {m: s.requests for m, s in self._states.items() if s.rows}
        self.prompt_cache_bytes = self._prefix.nbytes
        self.active_memory_bytes = mx.get_active_memory()

    def _made_progress(self) -> None:
        self.progress += 1

    # -- admission ---------------------------------------------------------------------------------------

    def _rows_running(self) -> int:
        return sum(len(s.rows) for s in self._states.values())

    def _admit(self) -> None:
        """Start waiting requests whose model is loaded while there is room, in order; a request whose model
        is loading stays waiting and lets later ones pass; one that waits for memory holds the later ones
        back (first come, first served). Between two passes, the model load in progress gets its piece, so a
        request whose load ends in this step starts in this step."""
        busy = self.busy_models()
        changes = self.residency.changes
        self._start_waiting(busy)
        if self.residency.advance(busy, idle=not self._where):
            self.progress += 1
        if self.residency.changes != changes:
            self._heartbeat_if_changed()
            self._start_waiting(busy)

    def _gathering(self) -> bool:
        """Whether arrivals wait for company: while a batch decodes, every start costs each running row a
        prefill pass of its own, so requests arriving within `prefill_gather_steps` steps of the first one
        start together (one pass for up to a prefill batch of prompts). An idle engine starts one at once, and
        as many arrivals as there are rows running (two at least) start at once too: the pass then costs the
        few running rows less than waiting costs the many arrivals (clients that came back together, to a lone
        solo row). A lone arrival still waits for company: agents sharing a long system prompt arrive a step
        or two apart, and prefill it once when they start together (`_prefill_shared_prefix`).
        Counted in steps, not seconds, so a group's ranks decide alike."""
        running = self._rows_running()  # rows, as the company (a request asks for n)
        company = min(self._prefill_batch, self.config.max_running - running, max(2, running))
        return bool(self._where) and self._waiting.gathering(self._steps, self.config.prefill_gather_steps, company)

    def _start_waiting(self, busy: set[str]) -> None:
        gathering = self._gathering()  # decided once per pass: requests that start in one pass share a prefill
        for command in self._waiting:
            if self._rows_running() + command.n > self.config.max_running:
                break
            try:
                cached = self.residency.acquire(command.model, busy, waiter=command.request_id)
                if cached is None:  # its model is loading (stays counted as waiting)
                    if self._waiting.first_time_loading(command.request_id):
                        self._emit(Loading(command.request_id, command.model))
                    continue
                self._heartbeat_if_changed()  # a reload or an eviction just happened: the gateway hears first
                serving = self._states.get(cached.id)
                if vision.takes_images(cached) and serving is not None and serving.rows:
                    continue  # a vision model serves one request at a time (engine/vision.py): its turn comes
                if not self._start(command, cached, gathering):
                    break
            except EngineError as exc:
                self._heartbeat_if_changed()  # the gateway's model list shows the failure with the error
                self._emit(Failed(command.request_id, exc.code.value, exc.message, exc.param))
            except Exception as exc:
                log.exception("request %s failed while joining the batch", command.request_id)
                self._emit(Failed(command.request_id, EngineErrorCode.INTERNAL.value, _internal(exc)))
            self._leave_waiting(command)
            busy.add(command.model)
            self._publish()

    def _leave_waiting(self, command: Generate) -> None:
        self._waiting.remove(command)
        self._waiting_tokens.pop(command.request_id, None)
        self.residency.forget_waiter(command.request_id)

    def _start(self, command: Generate, cached: CachedModel, gathering: bool) -> bool:
        """Start a request on its loaded model; False while it stays waiting, for company (`_gathering`) or
        for its KV cache to fit. It is planned first, so a request that cannot run is refused at once."""
        state = self._state_for(cached)
        plan = self._waiting.plan_of(command.request_id) or self._plan(command, cached, state)
        rows = len(plan.choices)
        if gathering or not self.residency.reserve_kv(
            command.request_id, cached.id, len(plan.tokens) + plan.max_tokens, self.busy_models(), rows
        ):
            self._waiting.keep_plan(command.request_id, plan)  # not tokenized and compiled again while it waits
            return False
        if self.config.allow_fault_injection:
            faults.before_start(command.fault)
        try:
            self._begin(command, cached, state, plan)
        except BaseException:
            self.residency.request_done(command.request_id, cached.id)
            raise
        return True

    def _plan(self, command: Generate, cached: CachedModel, state: ModelState) -> RequestPlan:
        if not vision.takes_images(cached):
            vision.refuse_images(command, cached.entry, sees=False)  # e.g. loaded as text by an engine group
            return plan_request(command, cached, state.token_text, self.config.allow_fault_injection)
        tokens, pixels = vision.prompt_of(command, cached)  # the images' tokens in: counted in context and KV
        plan = plan_request(command, cached, state.token_text, self.config.allow_fault_injection, prompt=tokens)
        plan.pixels = pixels
        return plan

    def _begin(self, command: Generate, cached: CachedModel, state: ModelState, plan: RequestPlan) -> None:
        tokens = plan.tokens
        if plan.pixels is not None:  # a vision model: its own solo path, never the batch or the prefix cache
            request = Request(command, len(tokens), 0)
            row = Row(request, plan.choices[0], plan.max_tokens)
            row.solo = vision.new_generation(cached, tokens, plan.pixels, plan.max_tokens, plan.choices[0])
            request.rows = [row]
            state.rows[row.uid] = row
            self._where[command.request_id] = (state, request)
            self._emit(Started(command.request_id, len(tokens), 0))
            return
        shared_now = self._prefill_shared_prefix(command, cached, state, tokens)
        prompt_cache, rest = self._prefix.fetch(cached.id, tokens)
        cached_tokens = len(tokens) - len(rest)
        # What it found cached, not what it prefilled just now for the others (that was its own prefill).
        request = Request(command, len(tokens), max(0, cached_tokens - shared_now))
        solo = state.solo_row
        if solo is not None:
            self._join_batch(state, solo)
        if len(plan.choices) == 1 and not state.rows and not self._waiting.others_for(command.model, command):
            choice = plan.choices[0]
            row = Row(request, choice, plan.max_tokens)
            prompt_cache = prompt_cache if prompt_cache is not None else make_prompt_cache(cached.artifacts.model)
            drafts = self._draft_lookup(tokens, plan, choice, prompt_cache)
            row.solo = SoloGeneration(cached.artifacts.model, tokens, prompt_cache, cached_tokens, choice.sampler,
                                      choice.processors, self.config.prefill_step_size, self._made_progress,
                                      state.pacer, self._solo_one_pass_tokens, drafts,
                                      self.max_draft_tokens if drafts is not None else 0)
            rows = [row]
        elif len(plan.choices) == 1:
            rows = [self._insert(state, request, plan.choices[0], plan.max_tokens, [rest], prompt_cache,
                                 tokens[:cached_tokens])]
        else:
            # n choices share one prefill: the prompt but its last token goes into one cache, then each
            # choice starts from a copy of it with that last token as its one-token prompt.
            shared = prompt_cache if prompt_cache is not None else make_prompt_cache(cached.artifacts.model)
            prefill(cached.artifacts.model, rest[:-1], shared, state.pacer, self._made_progress)
            rows = [self._insert(state, request, choice, plan.max_tokens, [rest[-1:]], copy.deepcopy(shared),
                                 tokens[:-1]) for choice in plan.choices]
        request.rows = rows
        for row in rows:
            state.rows[row.uid] = row
        self._where[command.request_id] = (state, request)
        self._emit(Started(command.request_id, len(tokens), request.cached_tokens))

    def _draft_lookup(self, tokens: list[int], plan: RequestPlan, choice: ChoicePlan,
                      prompt_cache: list[Any]) -> DraftLookup | None:
        """Where a solo request's drafts come from, or None where it decodes one token a pass: speculative
        decoding is off, a logits processor (grammar, penalties, bias) reads each token before the next is
        drawn, its cache cannot drop any number of rejected drafts at any length (only a plain or quantized KV
        cache can: a rotating one stops trimming once it wraps, a chunked one trims within its chunk, recurrent
        layers not at all), or it is an engine group's (its ranks would have to agree on every draft)."""
        if (self.max_draft_tokens <= 0 or choice.processors or self.config.group is not None
                or not all(type(layer) in _TRIMMABLE_CACHES for layer in prompt_cache)):
            return None
        return DraftLookup(tokens, source=plan.prediction)

    def _prefill_shared_prefix(self, command: Generate, cached: CachedModel, state: ModelState,
                               tokens: list[int]) -> int:
        """Agents sharing a system prompt arrive together, and each would prefill it: when requests waiting for
        the same model share a long prefix with this one that the prefix cache lacks, prefill that prefix once
        here and keep it in the prefix cache, so this request and the others start from it. Returns the tokens
        prefilled here (0: nothing worth sharing)."""
        if len(tokens) < SHARED_PREFIX_MIN_TOKENS or self.config.prompt_cache_bytes <= 0:
            return 0
        others = [c for c in self._waiting if c.model == command.model and c is not command][:self._prefill_batch]
        shared = 0
        for other in others:
            other_tokens = self._waiting_tokens.get(other.request_id)
            if other_tokens is None:
                try:
                    other_tokens = prompt_tokens(other, cached.artifacts.tokenizer)
                except Exception:  # its own start will say what is wrong with it
                    continue
                self._waiting_tokens[other.request_id] = other_tokens  # tokenized once while it waits
            shared = max(shared, _common_prefix(tokens, other_tokens))
        if shared < SHARED_PREFIX_MIN_TOKENS:
            return 0
        prompt_cache, rest = self._prefix.fetch(cached.id, tokens[:shared])
        if len(rest) < SHARED_PREFIX_MIN_TOKENS:  # (mostly) cached already
            return 0
        prompt_cache = prompt_cache if prompt_cache is not None else make_prompt_cache(cached.artifacts.model)
        prefill(cached.artifacts.model, rest, prompt_cache, state.pacer, self._made_progress)
        self._prefix.save(cached.id, prompt_cache, tokens[:shared])
        log.info("request %s: prefilled %d prompt tokens it shares with %d waiting requests, once for all",
                 command.request_id, len(rest), len(others))
        return len(rest)

    def _insert(self, state: ModelState, request: Request, choice: ChoicePlan, max_tokens: int,
                prompt: list[list[int]], prompt_cache: list[Any] | None, in_cache: list[int]) -> Row:
        (uid,) = state.generator.insert(
            prompt,
            max_tokens=[max_tokens],
            caches=[prompt_cache],  # None: a fresh cache
            all_tokens=[in_cache],
            samplers=[choice.sampler],
            logits_processors=[choice.processors],
        )
        return Row(request, choice, max_tokens, uid)

    def _join_batch(self, state: ModelState, row: Row) -> None:
        """Move the solo row into the batch: hand out the token it has in flight, then insert it with its
        KV cache and that token as its one-token "prompt", so nothing is recomputed or lost."""
        solo = row.solo
        assert solo is not None
        try:
            last = self._solo_token(state, row, more=False)
            self._on_token(state, row, last)
            if row.ended:
                return  # that token ended it
            (uid,) = state.generator.insert(
                [[last.token]],
                max_tokens=[row.max_tokens - row.plan.output.completion_tokens],
                caches=[solo.prompt_cache],
                all_tokens=[solo.tokens_in_cache],
                samplers=[row.plan.sampler],
                logits_processors=[row.plan.processors],
            )
        except Exception as exc:  # its failure is its own, not the arriving request's
            log.exception("request %s failed while joining the batch from solo", row.request.rid)
            self._fail(state, row.request, EngineError(EngineErrorCode.INTERNAL, _internal(exc)))
            return
        del state.rows[SOLO_UID]
        row.drafted, row.accepted = _drafts_of(solo)
        row.uid, row.solo = uid, None
        state.rows[uid] = row

    def _state_for(self, cached: CachedModel) -> ModelState:
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
            prefill_batch_size=min(self._prefill_batch, self.config.max_running),
            prefill_step_size=self.config.prefill_step_size,
        )
        joining.join_in_step(generator)  # a new row's first token comes from the batch's step, not a pass
        piece_s = 0.0 if self.config.group is not None else self.config.prefill_piece_s  # ranks run alike
        pacer = PrefillPacer(self.config.prefill_step_size, piece_s)
        state = ModelState(cached, generator, TokenText(tokenizer), pacer)
        self._states[cached.id] = state
        return state

    def _drop_model(self, model_id: str, reason: str = "The model was unloaded.") -> None:
        """Let go of a model's generator and prefix cache (residency is evicting or reloading it)."""
        state = self._states.pop(model_id, None)
        self._prefix.drop(model_id)
        if state is None:
            return
        for request in {id(r.request): r.request for r in state.rows.values()}.values():
            self._fail(state, request, EngineError(EngineErrorCode.INTERNAL, reason))
        state.generator.close()

    # -- decoding ----------------------------------------------------------------------------------------

    def _step_model(self, state: ModelState) -> None:
        solo = state.solo_row
        if solo is not None:
            self._step_solo(state, solo)
            return
        try:
            state.generator.prefill_step_size = state.pacer.size
            began = time.monotonic()
            with constrained_step(state.generator), batch_cache.pieces_of(state.pacer.size):
                prompt_responses, responses = state.generator.next()
            state.pacer.observe(_prefilled(state, prompt_responses), time.monotonic() - began)
            timeline.mark_sampled()  # benchmark timeline: a no-op unless on (mlx_backend/timeline.py)
        except Exception as exc:
            # The generator's state is unknown after a failed step: end its requests and start it over.
            log.exception("a batch step of model %s failed", state.cached.id)
            self._states.pop(state.cached.id, None)
            for request in {id(r.request): r.request for r in state.rows.values()}.values():
                self._forget(state, request)
                self._emit(Failed(request.rid, EngineErrorCode.INTERNAL.value, _internal(exc)))
            state.generator.close()
            return
        finally:
            self.progress += 1
        for response in responses:
            row = state.rows.get(response.uid)
            if row is None or row.ended:
                continue
            try:
                self._on_token(state, row, response)
            except Exception as exc:
                self._fail_decoding(state, row, exc)

    def _step_solo(self, state: ModelState, row: Row) -> None:
        try:
            token = self._solo_token(state, row, more=not row.next_is_last)
            self._keep_long_prompt(state, row)
            self._on_token(state, row, token)
        except Exception as exc:
            self._fail_decoding(state, row, exc)
        finally:
            self.progress += 1

    def _keep_long_prompt(self, state: ModelState, row: Row) -> None:
        """Right after a long solo prefill, a copy of its KV cache goes to the prefix cache: requests that
        arrived during it (agents sharing its system prompt) start from there instead of prefilling it again."""
        solo = row.solo
        if solo is None or solo.prefilled < SHARED_PREFIX_MIN_TOKENS or row.ended:
            return
        if sum(c.nbytes for c in solo.prompt_cache) > self.config.prompt_cache_bytes // 2:
            return  # a copy that large would only push the rest out of the prefix cache (or not fit at all)
        self._prefix.save(state.cached.id, copy.deepcopy(solo.prompt_cache), list(solo.tokens_in_cache))

    def _fail_decoding(self, state: ModelState, row: Row, exc: Exception) -> None:
        if isinstance(exc, ConstraintFailed):
            log.error("request %s: %s", row.request.rid, exc)
            self._fail(state, row.request, EngineError(EngineErrorCode.INTERNAL, str(exc)))
            return
        log.exception("request %s failed during decoding", row.request.rid)
        self._fail(state, row.request, EngineError(EngineErrorCode.INTERNAL, _internal(exc)))

    def _solo_token(self, state: ModelState, row: Row, more: bool) -> Token:
        """The solo row's next token, with the finish reason BatchGenerator would give it."""
        solo = row.solo
        assert solo is not None
        token = solo.next_token(more)
        timeline.mark_sampled()  # benchmark timeline: a no-op unless on (mlx_backend/timeline.py)
        if token in state.cached.artifacts.tokenizer.eos_token_ids:
            reason: str | None = "stop"
        elif row.next_is_last:
            reason = "length"
        else:
            return Token(token, None, solo.logprobs)
        return Token(token, reason, solo.logprobs, solo.prompt_cache, solo.tokens_in_cache)

    def _on_token(self, state: ModelState, row: Row, response: Token | Any) -> None:
        """One generated token of one row: a GenerationBatch.Response, or a Token from the solo path."""
        if self.config.allow_fault_injection:
            faults.while_decoding(row.request.command.fault)
        if row.plan.constraint is not None:
            row.plan.constraint.raise_if_failed()
        delta, ended = row.plan.output.on_token(response.token, response.finish_reason, response.logprobs)
        if ended is not None and row.plan.constraint is not None and row.plan.constraint.closed_by_reserve:
            ended = "length"  # the closing reserve ended it: the budget ran out, however complete it looks
        if delta is not None:
            self._emit(delta)
        if ended is None:
            return
        if row.plan.index == 0:
            self._keep_prefix(state, row, response)
        self._end_row(state, row, ended, still_generating=response.finish_reason is None)

    def _keep_prefix(self, state: ModelState, row: Row, response: Token | Any) -> None:
        if vision.takes_images(state.cached):
            return  # an image's tokens do not say which image: nothing of a vision model's is reused
        if response.finish_reason is not None:  # the generator handed over its cache
            self._prefix.save(state.cached.id, response.prompt_cache, response.all_tokens)
        elif row.solo is not None:
            self._prefix.save(state.cached.id, row.solo.prompt_cache, row.solo.tokens_in_cache)
        else:  # ended by us (a stop string, a complete call) while the generator would go on
            saved = state.generator.extract_cache([row.uid])
            if row.uid in saved:
                self._prefix.save(state.cached.id, *saved[row.uid])

    # -- endings -----------------------------------------------------------------------------------------

    def _end_row(self, state: ModelState, row: Row, reason: str, still_generating: bool) -> None:
        row.ended = True
        if still_generating and row.solo is None:
            state.generator.remove([row.uid])
        state.rows.pop(row.uid, None)
        request = row.request
        drafted, accepted = _drafts_of(row.solo) if row.solo is not None else (row.drafted, row.accepted)
        self._emit(Finished(request.rid, reason, request.prompt_tokens, row.plan.output.completion_tokens,
                            request.cached_tokens, row.plan.index, row.plan.output.stop_sequence,
                            row.plan.output.reasoning_tokens, drafted, accepted))
        if not request.open_rows:
            self._where.pop(request.rid, None)
            self._done(state, request)

    def _take_out(self, state: ModelState, request: Request) -> None:
        """Remove every row of a request from its model's batch."""
        uids = [r.uid for r in request.open_rows if r.uid != SOLO_UID]
        if uids:
            state.generator.remove(uids)
        self._forget(state, request)

    def _fail(self, state: ModelState, request: Request, error: EngineError) -> None:
        self._take_out(state, request)
        self._emit(Failed(request.rid, error.code.value, error.message, error.param))

    def _forget(self, state: ModelState, request: Request) -> None:
        for row in request.rows:
            row.ended = True
            if state.rows.get(row.uid) is row:
                del state.rows[row.uid]
        self._where.pop(request.rid, None)
        self._done(state, request)

    def _done(self, state: ModelState, request: Request) -> None:
        """A request is over: its KV reservation goes back, and its model's keep-alive counts from now."""
        self.residency.request_done(request.rid, state.cached.id)


@contextlib.contextmanager
def constrained_step(generator: Any) -> Iterator[None]:
    """Plan the coming step for the constrained rows of the batch: their masks are then computed together,
    while the forward pass runs, and applied to the whole batch's logits in one op (mlx_backend/engine/masks.py).

    The engine's generator (engine/joining.py) is planned inside its step, once the rows joining in it are in:
    a joining row's first step is planned with the others. A stock BatchGenerator is planned before its step
    (its new rows took their first step in a pass of their own)."""
    batch = generator._generation_batch
    if not isinstance(batch, joining.JoiningBatch):
        with _masked_step(batch):
            yield
        return
    batch.around_step = lambda: _masked_step(batch)
    try:
        yield
    finally:
        batch.around_step = None


@contextlib.contextmanager
def _masked_step(batch: Any) -> Iterator[None]:
    """mlx-lm's step calls the processors row by row (a slice, a token-context update and a call per row, then
    a concatenation) as soon as any row has one. So for this step the generation batch's model is a
    `MaskedForward` that masks the logits it returns, and the rows whose only processor is their grammar have
    their processors set aside (restored after): with no other processor in the batch, mlx-lm takes its path
    without a per-row loop. Rows with penalties or a logit bias keep theirs, grammar last, as before (their row
    of the mask is applied twice: the same logits). mlx-lm keeps no token context for a row set aside, so once
    planned, every later step of a batch must be planned here too (the batcher's only way to step). A grammar
    that has not started (a row in its first step: its prompt's last token is fed) consumes nothing.

    Reads mlx-lm 0.32.2's GenerationBatch (pinned; tests/unit/mlx_backend/engine/test_masks.py fails if it
    moves): the rows' uids and processors, the tokens this step feeds (the ones sampled last step, still lazy,
    and the joining rows' last prompt tokens), and the model its step calls. A step that never called that model
    fails, rather than let the rows set aside sample unmasked."""
    rows = [(row, p) for row, processors in enumerate(batch.logits_processors or ()) for p in processors or ()
            if isinstance(p, ConstraintProcessor)]
    if not rows:
        yield
        return
    step = plan_rows(rows, batch._next_tokens)
    alone = [(i, p) for i, p in rows if tuple(batch.logits_processors[i]) == (p,)]
    set_aside = {batch.uids[i]: batch.logits_processors[i] for i, _ in alone}
    for i, _ in alone:
        batch.logits_processors[i] = ()
    model = batch.model
    batch.model = forward = MaskedForward(model, step, [p for _, p in alone])
    try:
        yield
    finally:
        batch.model = model
        for i, uid in enumerate(batch.uids):  # rows that ended are gone
            if uid in set_aside:
                batch.logits_processors[i] = set_aside[uid]
        for _, processor in rows:
            processor.plan(None)  # a step that failed before asking leaves no plan behind
    if not forward.spent:  # loudly: the rows set aside would have sampled tokens their grammars forbid
        raise RuntimeError("mlx-lm's generation step did not call the model it was given: constrained rows "
                           "went unmasked (mlx_backend/engine/batcher.py, constrained_step)")


def drafting_pays(gpu: bool) -> bool:
    """Whether a pass of several tokens costs about what a pass of one does here, as speculative decoding needs:
    on a GPU, and on a CPU whose BLAS multiplies rows together (Accelerate, OpenBLAS). MLX's Linux wheel's
    reference BLAS takes k times as long for k tokens (SmolLM2-135M: 134 ms for one, 1019 for nine; OpenBLAS 73
    and 116), so there a rejected draft costs its whole pass."""
    return gpu or sys.platform != "linux" or not cpu_blas.reference_in_use()


def _drafts_of(solo: SoloGeneration | Any) -> tuple[int, int]:
    """(drafted, accepted) of a solo generation (a vision model's drafts nothing)."""
    return (solo.drafted, solo.accepted) if isinstance(solo, SoloGeneration) else (0, 0)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _prefilled(state: ModelState, prompt_responses: list[Any]) -> int:
    """The most prompt tokens one row prefilled in this step. BatchGenerator answers every row still in its
    prompt with how many of the prompt's tokens are in (`progress`); `state.prefilled` keeps the last answers."""
    before, state.prefilled = state.prefilled, {}
    most = 0
    for response in prompt_responses:
        if response.end_of_prompt:  # moved to decoding: nothing prefilled in this step
            continue
        done = int(response.progress[0])
        most = max(most, done - before.get(response.uid, 0))
        state.prefilled[response.uid] = done
    return most


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _internal(exc: BaseException) -> str:
    return f"The engine failed while generating: {type(exc).__name__}: {_short(exc)}"
