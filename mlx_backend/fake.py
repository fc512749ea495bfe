"""A scripted engine for unit tests of the HTTP layer. Never the proof that a capability works: the
integration tests run the real engine process.

It answers every request with `reply` split into word "tokens", honours max_tokens and stop strings
like the real engine (stop text never emitted), and can be told to fail in the ways the real one does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mlx_backend.engine import EngineState, EngineStatus, GenerationStream, unavailable
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.types import Delta, FailedModel, Finished, Generate, Heartbeat, LoadedModel, Started


def default_reply(command: Generate) -> str:
    return "Hello from the scripted engine. It has nothing to say."


class FakeEngine:
    def __init__(
        self,
        reply: Callable[[Generate], str] = default_reply,
        token_delay_s: float = 0.0,
        context_length: int = 512,
        failures: dict[str, EngineError] | None = None,
    ) -> None:
        self.reply = reply
        self.token_delay_s = token_delay_s
        self.context_length = context_length
        self.failures = failures or {}  # model id -> the error its load gives
        self.state = EngineState.STOPPED
        self.loaded: dict[str, float] = {}
        self.received: list[Generate] = []
        self.aborted: list[str] = []
        self._in_flight: dict[str, Finished | None] = {}

    async def start(self) -> None:
        self.state = EngineState.UP

    async def stop(self) -> None:
        self.state = EngineState.STOPPED
        self.loaded.clear()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def end_all(self, finish_reason: str) -> int:
        for rid in self._in_flight:
            self._in_flight[rid] = Finished(rid, finish_reason, 0, 0, 0)
        return len(self._in_flight)

    async def generate(self, command: Generate, timeout_s: float | None = None) -> GenerationStream:
        if self.state != EngineState.UP:
            raise unavailable(self.state)
        self.received.append(command)
        if command.model in self.failures:
            raise self.failures[command.model]
        prompt = command.prompt if command.prompt is not None else " ".join(m.content for m in command.messages or ())
        prompt_tokens = len(prompt.split())
        if prompt_tokens >= self.context_length:
            raise EngineError(
                EngineErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"The prompt has {prompt_tokens} tokens; the model's context is {self.context_length}.",
                "messages" if command.messages is not None else "prompt",
            )
        self.loaded[command.model] = time.time()
        rid = command.request_id
        self._in_flight[rid] = None
        finished = False
        try:
            yield Started(rid, prompt_tokens, 0)
            text = self.reply(command)
            cut = min((text.find(s) for s in command.params.stop if s in text), default=-1)
            words = (text[:cut] if cut >= 0 else text).split(" ")
            budget = command.params.max_tokens
            emitted = 0
            for i, word in enumerate(words[:budget]):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                ended = self._in_flight.get(rid)
                if ended is not None:
                    finished = True
                    yield Finished(rid, ended.finish_reason, prompt_tokens, emitted, 0)
                    return
                emitted += 1
                yield Delta(rid, word if i == 0 else " " + word, 1)
            reason = "length" if len(words) > budget else "stop"
            finished = True
            yield Finished(rid, reason, prompt_tokens, emitted, 0)
        finally:
            self._in_flight.pop(rid, None)
            if not finished:
                self.aborted.append(rid)

    def status(self) -> EngineStatus:
        now = time.time()
        heartbeat = Heartbeat(
            progress=0, running=len(self._in_flight), waiting=0, loading=None,
            loaded=tuple(LoadedModel(m, 1000, t, 0) for m, t in self.loaded.items()),
            failed=tuple(FailedModel(m, e.code.value, e.message, now, 30.0) for m, e in self.failures.items()),
            memory_budget_bytes=1 << 30, active_memory_bytes=0, prompt_cache_bytes=0,
        )
        return EngineStatus(
            state=self.state, pid=None, restarts=0, device="fake", last_exit=None, stalled=False,
            seconds_since_progress=None, heartbeat=heartbeat if self.state == EngineState.UP else None,
        )
