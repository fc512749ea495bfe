"""The Messages API on the serving path (gateway/serving/generation.py): one reply of blocks, streamed as
Anthropic's events or returned as one message."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from gateway.messages import convert
from gateway.messages.wire import Message, MessageCreateRequest
from gateway.serving.exchange import Exchange
from gateway.serving.generation import fold_reply, stream_reply
from gateway.settings import Settings


class MessageAdapter:
    engine_fields: Mapping[str, str] = convert.ENGINE_FIELDS

    def __init__(self, data: MessageCreateRequest, settings: Settings, request_id: str) -> None:
        self.command = convert.to_generate(data, request_id, settings.test_faults)
        self.message_id = f"msg_{request_id}"
        self.model = data.model

    def stream(self, exchange: Exchange) -> AsyncIterator[bytes]:
        renderer = convert.MessageStream(self.message_id, self.model, exchange.prompt_tokens, exchange.cached_tokens)
        return stream_reply(exchange, renderer)

    async def whole(self, exchange: Exchange) -> Message:
        reply, finished = await fold_reply(exchange)
        return convert.message(self.message_id, self.model, reply, finished)
