"""Chat and legacy completions on the serving path (gateway/serving/generation.py): text per choice, n choices
at once, streamed as chunks (the usage chunk and `[DONE]` last) or folded per choice into one body. The two
APIs differ only in their `Renderer`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from gateway.chat import convert, render
from gateway.chat.render import FoldedChoice, ResponseMeta
from gateway.chat.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Usage,
)
from gateway.errors import GatewayError, internal
from gateway.serving import sse
from gateway.serving.exchange import Exchange
from gateway.settings import Settings
from mlx_backend import timeline
from mlx_backend.contract import Delta, Finished, Generate

log = logging.getLogger("mlx_gateway")


class Renderer(Protocol):
    """Chat and legacy completions differ only in the shape of what they send."""

    def opening(self, meta: ResponseMeta, index: int) -> Any | None: ...
    def delta_event(self, meta: ResponseMeta, delta: Delta) -> bytes | None:
        """The SSE event of a Delta, ready to send; None: it carries nothing to send."""
    def closing(self, meta: ResponseMeta, index: int, finish_reason: str) -> Any: ...
    def usage(self, meta: ResponseMeta, usage: Usage) -> Any: ...
    def whole(self, meta: ResponseMeta, choices: list[FoldedChoice], usage: Usage) -> Any: ...


def chat_adapter(data: ChatCompletionRequest, settings: Settings, request_id: str) -> ChoicesAdapter:
    command = convert.chat_to_generate(data, request_id, settings.max_tokens_default, settings.test_faults)
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    return ChoicesAdapter(command, ResponseMeta(f"chatcmpl-{request_id}", data.model),
                          ChatRenderer(logprobs=command.params.logprobs is not None), include_usage)


def completion_adapter(data: CompletionRequest, settings: Settings, request_id: str) -> ChoicesAdapter:
    command = convert.completion_to_generate(data, request_id, settings.test_faults)
    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    return ChoicesAdapter(command, ResponseMeta(f"cmpl-{request_id}", data.model),
                          CompletionRenderer(logprobs=command.params.logprobs is not None), include_usage)


class ChoicesAdapter:
    """Chat and legacy completions: text per choice, streamed as chunks or folded per choice."""

    engine_fields: Mapping[str, str] = {}  # the engine already speaks chat's names

    def __init__(self, command: Generate, meta: ResponseMeta, renderer: Renderer, include_usage: bool) -> None:
        self.command = command
        self.meta = meta
        self.renderer = renderer
        self.include_usage = include_usage

    def stream(self, exchange: Exchange) -> AsyncIterator[bytes]:
        return _stream(exchange, self.meta, self.renderer, self.include_usage)

    async def whole(self, exchange: Exchange) -> Any:
        return await _fold(exchange, self.meta, self.renderer)


def usage(exchange: Exchange) -> Usage:
    """Tokens so far: the prompt once, every choice's completion tokens."""
    sent_prediction = isinstance(exchange.command, Generate) and exchange.command.prediction is not None
    predicted = exchange.draft_tokens if sent_prediction else None
    return render.usage_of(exchange.prompt_tokens, exchange.completion_tokens, exchange.cached_tokens,
                           exchange.reasoning_tokens, predicted)


async def _stream(
    exchange: Exchange, meta: ResponseMeta, renderer: Renderer, include_usage: bool
) -> AsyncIterator[bytes]:
    try:
        for index in range(exchange.command.n):
            opening = renderer.opening(meta, index)
            if opening is not None:
                yield sse.event(opening)
        texts = 0
        tail = b""  # the last choice's closing chunk: it goes out with the usage chunk and [DONE], one write
        while not exchange.complete:
            event = await exchange.next()
            if isinstance(event, Finished):
                closing = sse.event(renderer.closing(meta, event.index, event.finish_reason))
                if exchange.complete:
                    tail = closing
                else:
                    yield closing
            elif (data := renderer.delta_event(meta, event)) is not None:
                if not timeline.ACTIVE:
                    yield data
                    continue
                handed = timeline.now()
                yield data  # Litestar sends it; we resume once its `send` has returned
                timeline.record("H", exchange.id, texts, exchange.completion_tokens, handed, timeline.now())
                texts += 1
        if include_usage:
            tail += sse.event(renderer.usage(meta, usage(exchange)))
        yield tail + sse.DONE
    except GatewayError as exc:
        log.warning("stream ended by error: %s", exc.message)
        yield sse.event(exc.body()) + sse.DONE
    except Exception:
        log.exception("stream failed")
        error = internal(meta.id)
        exchange.fail(error)
        yield sse.event(error.body()) + sse.DONE
    finally:
        exchange.close()  # a client that left ends its request here (or in the response's background task)


async def _fold(exchange: Exchange, meta: ResponseMeta, renderer: Renderer) -> Any:
    folder = render.Folder()
    for index in range(exchange.command.n):
        folder.choice(index)
    while not exchange.complete:
        event = await exchange.next()
        if isinstance(event, Finished):
            folder.choice(event.index).finish_reason = event.finish_reason
        else:
            folder.add(event)
    if timeline.ACTIVE:
        timeline.record("D", exchange.id, timeline.now())
    return renderer.whole(meta, folder.ordered(), usage(exchange))


# -- the two APIs' renderers ------------------------------------------------------------------------------


class ChatRenderer:
    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs
        self._text_slots: dict[int, sse.TextSlot | None] = {}  # per choice: its plain text chunk's slot

    def opening(self, meta: ResponseMeta, index: int) -> ChatCompletionChunk:
        return render.chat_opening_chunk(meta, index)

    def delta(self, meta: ResponseMeta, delta: Delta) -> ChatCompletionChunk | None:
        return render.chat_delta_chunk(meta, delta, self.logprobs)

    def delta_event(self, meta: ResponseMeta, delta: Delta) -> bytes | None:
        """A Delta of plain text (the per-token case) fills its choice's slot: the same bytes as rendering
        and encoding its chunk. Anything else in it (tool calls, logprobs, any field a Delta gains) differs
        from the plain Delta below and takes the general way."""
        if delta.text and delta == Delta(delta.request_id, delta.text, delta.tokens, index=delta.index):
            if delta.index not in self._text_slots:
                self._text_slots[delta.index] = sse.TextSlot.of(
                    lambda text: sse.event(self.delta(meta, Delta(delta.request_id, text, 1, index=delta.index))))
            slot = self._text_slots[delta.index]
            if slot is not None:
                return slot.event(delta.text)
        chunk = self.delta(meta, delta)
        return None if chunk is None else sse.event(chunk)

    def closing(self, meta: ResponseMeta, index: int, finish_reason: str) -> ChatCompletionChunk:
        return render.chat_closing_chunk(meta, index, finish_reason)

    def usage(self, meta: ResponseMeta, usage: Usage) -> ChatCompletionChunk:
        return render.chat_usage_chunk(meta, usage)

    def whole(self, meta: ResponseMeta, choices: list[FoldedChoice], usage: Usage) -> ChatCompletion:
        return render.chat_completion(meta, choices, usage, self.logprobs)


class CompletionRenderer:
    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs
        self._offsets: dict[int, int] = {}  # per choice: where the next chunk's text starts

    def opening(self, meta: ResponseMeta, index: int) -> None:
        return None

    def delta(self, meta: ResponseMeta, delta: Delta) -> Completion | None:
        if not delta.text and not delta.logprobs:
            return None
        offset = self._offsets.get(delta.index, 0)
        self._offsets[delta.index] = offset + len(delta.text)
        logprobs = render.completion_logprobs(delta.logprobs, self.logprobs, offset)
        return render.completion_chunk(meta, delta.index, delta.text, logprobs)

    def delta_event(self, meta: ResponseMeta, delta: Delta) -> bytes | None:
        chunk = self.delta(meta, delta)
        return None if chunk is None else sse.event(chunk)

    def closing(self, meta: ResponseMeta, index: int, finish_reason: str) -> Completion:
        return render.completion_chunk(meta, index, "", finish_reason=render.public_finish_reason(finish_reason))

    def usage(self, meta: ResponseMeta, usage: Usage) -> Completion:
        return render.completion_usage_chunk(meta, usage)

    def whole(self, meta: ResponseMeta, choices: list[FoldedChoice], usage: Usage) -> Completion:
        return render.completion(meta, choices, usage, self.logprobs)
