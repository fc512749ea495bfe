"""One object owns each generation request's life, from admission to its last byte: `Exchange`.

Phases: queued (admitted, waiting for a batch slot) -> loading (its model is being loaded) -> running (in
the batch) -> finishing (the engine is done with it; the response's last bytes may still be on their way)
-> done (the HTTP exchange is over). Whatever ends it — the engine finishing or failing, the request
timeout, the client leaving, the drain deadline — goes through `end`, the one place that interrupts the
engine request, frees the admission slot, and records the metrics and the log line. `close` marks the
HTTP exchange over and ends it first if nothing else did, so no path can leak a slot or an engine request.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway import metrics
from gateway.errors import ErrorKind, GatewayError
from mlx_backend.client.engine_request import EngineRequest, Interrupted
from mlx_backend.contract import Delta, Embed, Embedded, Finished, Generate, Loading, Started
from mlx_backend.errors import EngineError

log = logging.getLogger("mlx_gateway.requests")

Receive = Callable[[], Awaitable[Any]]  # ASGI receive


class Phase(enum.IntEnum):
    QUEUED = 0
    LOADING = 1
    RUNNING = 2
    FINISHING = 3
    DONE = 4


class Ending(enum.StrEnum):
    FINISHED = "finished"  # the engine ended it (stop, length)
    FAILED = "failed"  # the engine could not serve it (load failure, context, engine lost...), or a server bug
    TIMEOUT = "timeout"
    CLIENT_GONE = "client_gone"
    DRAINED = "drained"  # the drain deadline cut it short


class Exchange:
    def __init__(
        self,
        command: Generate | Embed,
        engine_request: EngineRequest,
        *,
        timeout_s: float | None,
        on_end: Callable[[Exchange], None],
        arrived_at: float | None = None,
    ) -> None:
        self.command = command
        self.phase = Phase.QUEUED
        self.ending: Ending | None = None
        self.ended_in: Phase | None = None  # the phase it was in when it ended
        self.unfinished = set(range(command.n))  # choices the engine has not finished yet
        self.finish_reasons: dict[int, str] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0  # of completion_tokens, spent thinking (as each choice's Finished says)
        self.draft_tokens = (0, 0)  # speculative decoding's drafts: (kept, dropped), as Finished says
        self.arrived_at = arrived_at if arrived_at is not None else time.monotonic()
        self._engine_request = engine_request
        self._on_end = on_end
        self._timeout_s = timeout_s
        self._deadline = (
            asyncio.get_running_loop().call_later(timeout_s, self.end, Ending.TIMEOUT) if timeout_s else None
        )
        self._watcher: asyncio.Task[None] | None = None
        self._first_text_seen = False
        self._generated = metrics.GENERATION_TOKENS.labels(command.model)  # looked up once: bumped per delta

    @property
    def id(self) -> str:
        return self.command.request_id

    @property
    def holds_slot(self) -> bool:
        return self.phase < Phase.FINISHING

    @property
    def complete(self) -> bool:
        """Every choice has finished: nothing more will come."""
        return not self.unfinished

    # -- reading the engine's events ----------------------------------------------------------------------

    async def started(self) -> Started:
        """Wait until the request runs in the batch (through its model's load). Raises GatewayError."""
        while True:
            event = await self._next_event()
            if isinstance(event, Loading):
                self.phase = Phase.LOADING
            elif isinstance(event, Started):
                self.phase = Phase.RUNNING
                self.prompt_tokens, self.cached_tokens = event.prompt_tokens, event.cached_tokens
                metrics.QUEUE_TIME.observe(time.monotonic() - self.arrived_at)
                metrics.PROMPT_TOKENS.labels(self.command.model).inc(event.prompt_tokens)
                metrics.PROMPT_CACHED_TOKENS.labels(self.command.model).inc(event.cached_tokens)
                return event
            else:
                raise RuntimeError(f"the engine sent {type(event).__name__} before Started")

    async def next(self) -> Delta | Finished:
        """The next text, or a choice's end, after `started` (until `complete`). Raises GatewayError; the
        choices of a drained request get a Finished("length") each, so its client sees a clean, cut end."""
        try:  # the engine request directly, not through _next_event: one coroutine less to resume per token
            event = await self._engine_request.next()
        except (EngineError, Interrupted) as exc:
            event = self._stopped(exc)
        if isinstance(event, Delta):
            self.completion_tokens += event.tokens
            self._generated.inc(event.tokens)
            if (event.text or event.reasoning) and not self._first_text_seen:
                self._first_text_seen = True
                metrics.TIME_TO_FIRST_TOKEN.labels(self.command.model).observe(time.monotonic() - self.arrived_at)
            return event
        if isinstance(event, Finished):
            self.unfinished.discard(event.index)
            self.finish_reasons[event.index] = event.finish_reason
            self.reasoning_tokens += event.reasoning_tokens
            if event.draft_tokens:
                rejected = event.draft_tokens - event.accepted_draft_tokens
                kept, dropped = self.draft_tokens
                self.draft_tokens = (kept + event.accepted_draft_tokens, dropped + rejected)
                metrics.DRAFT_TOKENS.labels(self.command.model, "accepted").inc(event.accepted_draft_tokens)
                metrics.DRAFT_TOKENS.labels(self.command.model, "rejected").inc(rejected)
            if not self.unfinished:
                self.end(Ending.FINISHED)
            return event
        raise RuntimeError(f"the engine sent {type(event).__name__} after Started")

    async def embedded(self) -> Embedded:
        """An embedding request's vectors, after `started`; it ends here. Raises GatewayError (a drained one
        that had started is refused too: it has no partial answer)."""
        event = await self._next_event()
        if isinstance(event, Finished):  # drained while running
            self.unfinished.clear()
            raise GatewayError(ErrorKind.DRAINING, "The server is shutting down; retry on another instance or later.")
        if not isinstance(event, Embedded):
            raise RuntimeError(f"the engine sent {type(event).__name__} to an embedding request")
        self.unfinished.clear()
        self.end(Ending.FINISHED)
        return event

    async def _next_event(self) -> Loading | Started | Delta | Finished | Embedded:
        try:
            return await self._engine_request.next()
        except (EngineError, Interrupted) as exc:
            return self._stopped(exc)

    def _stopped(self, exc: EngineError | Interrupted) -> Finished:
        """What the engine failing the request, or its interruption, means to the reader: GatewayError raised,
        or for a drained running request the Finished of its next unfinished choice."""
        if isinstance(exc, EngineError):
            error = GatewayError.from_engine(exc)
            self.end(Ending.FAILED, error)
            raise error from exc
        if self.ending is Ending.DRAINED and self.ended_in is Phase.RUNNING and self.unfinished:
            index = min(self.unfinished)
            self.unfinished.discard(index)
            return Finished(self.id, "length", self.prompt_tokens, self.completion_tokens, self.cached_tokens, index)
        raise self._interruption() from None

    def _interruption(self) -> GatewayError:
        if self.ending is Ending.TIMEOUT:
            return GatewayError(ErrorKind.TIMEOUT, f"The request ran longer than the {self._timeout_s:g}s request "
                                                   "timeout; it was stopped.")
        if self.ending is Ending.DRAINED:
            return GatewayError(ErrorKind.DRAINING, "The server is shutting down and the request had not started; "
                                                    "retry on another instance or later.")
        return GatewayError(ErrorKind.CLIENT_CLOSED, "The client closed the connection; the request was stopped.")

    # -- the client's connection --------------------------------------------------------------------------

    def watch_disconnect(self, receive: Receive) -> None:
        """End the request as soon as the client hangs up, whatever phase it is in (queued requests too)."""

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.end(Ending.CLIENT_GONE)

        self._watcher = asyncio.create_task(watch(), name=f"disconnect-{self.id}")

    def stop_watching(self) -> None:
        """Hand the connection to the streaming response, which watches for disconnects itself."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    # -- the end ---------------------------------------------------------------------------------------------

    def end(self, ending: Ending, error: GatewayError | None = None) -> None:
        """The one way out: stop the engine's work if it still runs, free the slot, record. Idempotent."""
        if self.phase >= Phase.FINISHING:
            return
        was = self.ended_in = self.phase
        self.phase = Phase.FINISHING
        self.ending = ending
        self._engine_request.interrupt()  # aborts in the engine unless the engine already ended it
        if self._deadline is not None:
            self._deadline.cancel()
        self.stop_watching()
        self._on_end(self)
        self._record(was, error)

    def fail(self, error: GatewayError) -> None:
        """The server itself failed the request (a bug while rendering it): an error, never a cancellation."""
        self.end(Ending.FAILED, error)

    def close(self) -> None:
        """The HTTP exchange is over (response sent, or failed): end the request if nothing else did."""
        if self.phase < Phase.FINISHING:
            self.end(Ending.CLIENT_GONE)
        self.phase = Phase.DONE

    def _record(self, was: Phase, error: GatewayError | None) -> None:
        model = self.command.model
        elapsed = time.monotonic() - self.arrived_at
        ending = self.ending
        if ending is Ending.FINISHED:
            outcome = self.finish_reasons.get(0, "stop")
        elif ending is Ending.FAILED:
            outcome = "error"
        else:
            outcome = str(ending)
        metrics.REQUESTS_FINISHED.labels(model, outcome).inc()
        if ending in (Ending.FINISHED, Ending.DRAINED):
            metrics.E2E_LATENCY.labels(model).observe(elapsed)
        if ending is Ending.CLIENT_GONE:
            metrics.REQUESTS_CANCELLED.inc()
        detail = f": {error.message}" if error is not None else ""
        level = logging.INFO if ending in (Ending.FINISHED, Ending.DRAINED, Ending.CLIENT_GONE) else logging.WARNING
        log.log(level, "request %s %s (%s) after %.3fs, while %s; %d prompt (%d cached) + %d completion tokens%s",
                self.id, outcome, ending, elapsed, was.name.lower(), self.prompt_tokens, self.cached_tokens,
                self.completion_tokens, detail)

