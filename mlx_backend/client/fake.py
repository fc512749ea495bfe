"""A scripted engine for unit tests of the HTTP layer. Never the proof that a capability works: the
integration tests run the real engine process.

It answers every request with `reply` split into word "tokens", honours max_tokens and stop strings
like the real engine (stop text never emitted), and can be told to fail in the ways the real one does.
`calls` scripts tool calls after the text, streamed as the real engine streams them: a first piece with
id, name and the first character of the arguments, then the rest in two pieces.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections.abc import Callable, Sequence

from mlx_backend.client.engine import ControlAction, EngineState, EngineStatus, unavailable
from mlx_backend.client.engine_request import EngineRequest
from mlx_backend.contract import (
    Delta,
    Embed,
    Embedded,
    FailedModel,
    Finished,
    Generate,
    Heartbeat,
    LoadedModel,
    Loading,
    Started,
    ToolCallDelta,
)
from mlx_backend.errors import EngineError, EngineErrorCode


def default_reply(command: Generate) -> str:
    return "Hello from the scripted engine. It has nothing to say."


def no_calls(command: Generate) -> Sequence[tuple[str, str]]:
    return ()


def prompt_words(command: Generate) -> int:
    """The fake's prompt "tokens": words of the prompt or of every message's content."""
    prompt = command.prompt if command.prompt is not None else " ".join(m.content for m in command.messages or ())
    return len(prompt.split())


def fake_vector(text: str, dimensions: int) -> bytes:
    """The fake's embedding of a text: float32 bytes drawn from its hash (equal texts, equal vectors)."""
    digest = hashlib.sha256(text.encode()).digest() * (dimensions // 32 + 1)
    return struct.pack(f"<{dimensions}f", *((b - 128) / 128 for b in digest[:dimensions]))


class FakeEngine:
    def __init__(
        self,
        reply: Callable[[Generate], str] = default_reply,
        token_delay_s: float = 0.0,
        context_length: int = 512,
        failures: dict[str, EngineError] | None = None,
        load_delay_s: float = 0.0,
        calls: Callable[[Generate], Sequence[tuple[str, str]]] = no_calls,  # (name, arguments JSON) each
    ) -> None:
        self.reply = reply
        self.calls = calls
        self.token_delay_s = token_delay_s
        self.context_length = context_length
        self.failures = failures or {}  # model id -> the error its load gives
        self.state = EngineState.STOPPED
        self.loaded: dict[str, float] = {}
        self.received: list[Generate] = []
        self.counted: list[Generate] = []  # count_prompt's requests
        self.embedded: list[Embed] = []  # embedding requests
        self.aborted: list[str] = []
        self.load_delay_s = load_delay_s
        self.pinned: set[str] = set()
        self.controls: list[tuple[str, str]] = []  # (action, model) as received
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self.state = EngineState.UP

    async def stop(self) -> None:
        self.state = EngineState.STOPPED
        self.loaded.clear()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(self, command: Generate | Embed) -> EngineRequest:
        if self.state != EngineState.UP:
            raise unavailable(self.state)
        request = EngineRequest(command.request_id, self._abort)
        if isinstance(command, Embed):
            self.embedded.append(command)
            run = self._embed(command, request)
        else:
            self.received.append(command)
            run = self._run(command, request)
        self._tasks[command.request_id] = asyncio.get_running_loop().create_task(run)
        return request

    async def _embed(self, command: Embed, request: EngineRequest) -> None:
        """Word "tokens"; each input's vector drawn from its hash (`fake_vector`), 8 dimensions unless asked."""
        rid = command.request_id
        try:
            if command.model in self.failures:
                request.deliver(self.failures[command.model])
                return
            await self._load(command.model, request)
            tokens = sum(len(t.split()) for t in command.inputs)
            request.deliver(Started(rid, tokens, 0))
            width = command.dimensions or 8
            request.deliver(Embedded(rid, b"".join(fake_vector(t, width) for t in command.inputs), width, tokens))
        finally:
            self._tasks.pop(rid, None)

    async def _load(self, model: str, request: EngineRequest) -> None:
        """The model in use from now: first loaded (Loading, then the load's delay) unless it already is."""
        if model not in self.loaded:
            request.deliver(Loading(request.request_id, model))
            await asyncio.sleep(self.load_delay_s)
        self.loaded[model] = time.time()

    def _abort(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()
            self.aborted.append(request_id)

    async def _run(self, command: Generate, request: EngineRequest) -> None:
        rid = command.request_id
        try:
            if command.model in self.failures:
                request.deliver(self.failures[command.model])
                return
            prompt_tokens = prompt_words(command)
            if prompt_tokens >= self.context_length:
                request.deliver(EngineError(
                    EngineErrorCode.CONTEXT_LENGTH_EXCEEDED,
                    f"The prompt has {prompt_tokens} tokens; the model's context is {self.context_length}.",
                    "messages" if command.messages is not None else "prompt",
                ))
                return
            await self._load(command.model, request)
            request.deliver(Started(rid, prompt_tokens, 0))
            text = self.reply(command)
            cut, stop = min(((text.find(s), s) for s in command.params.stop if s in text), default=(-1, None))
            words = (text[:cut] if cut >= 0 else text).split(" ") if text else []
            budget = command.params.max_tokens
            for i, word in enumerate(words[:budget]):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                for index in range(command.n):  # every choice says the same
                    request.deliver(Delta(rid, word if i == 0 else " " + word, 1, index=index))
            calls = self.calls(command) if len(words) < budget and stop is None else ()
            for index, (name, arguments) in enumerate(calls):
                pieces = (arguments[:1], arguments[1:len(arguments) // 2], arguments[len(arguments) // 2:])
                request.deliver(Delta(rid, "", 1, (ToolCallDelta(index, f"call_fake{rid[-6:]}{index}", name,
                                                                 pieces[0]),)))
                for piece in filter(None, pieces[1:]):
                    request.deliver(Delta(rid, "", 1, (ToolCallDelta(index, arguments=piece),)))
            used = min(len(words), budget) + 3 * len(calls)
            reason = "tool_calls" if calls else "length" if len(words) > budget else "stop"
            for index in range(command.n):
                request.deliver(Finished(rid, reason, prompt_tokens, used, 0, index,
                                         stop_sequence=stop if reason == "stop" else None))
        except Exception as exc:  # as the real engine does: the request fails, the engine goes on
            request.deliver(EngineError(EngineErrorCode.INTERNAL, f"The engine failed while generating: {exc}"))
        finally:
            self._tasks.pop(rid, None)

    async def control(self, action: ControlAction, model: str) -> None:
        if self.state != EngineState.UP:
            raise unavailable(self.state)
        self.controls.append((action, model))
        if action in ("load", "pin"):
            if model in self.failures:
                raise self.failures[model]
            await asyncio.sleep(self.load_delay_s)
            self.loaded.setdefault(model, time.time())
            if action == "pin":
                self.pinned.add(model)
        elif action == "unload":
            if any(c.model == model for c in self.received if c.request_id in self._tasks):
                raise EngineError(EngineErrorCode.MODEL_BUSY, f"The model '{model}' is serving requests.")
            self.loaded.pop(model, None)
            self.pinned.discard(model)
        else:
            self.pinned.discard(model)

    async def count_prompt(self, command: Generate) -> int:
        if self.state != EngineState.UP:
            raise unavailable(self.state)
        self.counted.append(command)
        if command.model in self.failures:
            raise self.failures[command.model]
        return prompt_words(command)

    def status(self) -> EngineStatus:
        now = time.time()
        heartbeat = Heartbeat(
            progress=0, running=len(self._tasks), waiting=0, loading=None,
            loaded=tuple(LoadedModel(m, 1000, t, 0, last_used_at=t, pinned=m in self.pinned)
                         for m, t in self.loaded.items()),
            failed=tuple(FailedModel(m, e.code.value, e.message, now, 30.0) for m, e in self.failures.items()),
            memory_budget_bytes=1 << 30, active_memory_bytes=0, prompt_cache_bytes=0,
        )
        return EngineStatus(
            state=self.state, pid=None, restarts=0, device="fake", last_exit=None, stalled=False,
            seconds_since_progress=None, heartbeat=heartbeat if self.state == EngineState.UP else None,
        )
