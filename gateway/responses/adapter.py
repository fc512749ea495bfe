"""The Responses API on the serving path (gateway/serving/generation.py): one reply of blocks, streamed as
typed events or returned as one response object; kept in the response store when asked to, for a later
`previous_response_id`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from gateway.errors import ErrorKind, GatewayError
from gateway.responses import convert
from gateway.responses.store import ResponseStore
from gateway.responses.wire import ResponseCreateRequest, ResponseObject
from gateway.serving.exchange import Exchange
from gateway.serving.generation import fold_reply, stream_reply
from gateway.serving.reply import Reply
from gateway.settings import Settings

log = logging.getLogger("mlx_gateway")


class ResponseAdapter:
    engine_fields: Mapping[str, str] = convert.ENGINE_FIELDS

    def __init__(self, data: ResponseCreateRequest, settings: Settings, store: ResponseStore, request_id: str) -> None:
        history: tuple[Any, ...] = ()
        if data.previous_response_id is not None:
            found = store.conversation(data.previous_response_id)
            if found is None:
                raise GatewayError(
                    ErrorKind.PREVIOUS_RESPONSE_NOT_FOUND,
                    f"Previous response with id '{data.previous_response_id}' not found. Responses are kept in "
                    "this server's memory only (bounded by --responses-store-mb, least recently used forgotten "
                    "first, lost on restart); send the whole conversation as input instead.",
                    "previous_response_id",
                )
            history = found
        self.new_input = convert.input_messages(data.input)
        self.command = convert.to_generate(data, request_id, history, self.new_input, settings.max_tokens_default,
                                           settings.test_faults)
        self.store = store
        self.keep = data.store is not False and store.enabled
        self.base = convert.new_response(data, request_id, self.keep)

    def done(self, response: ResponseObject, reply: Reply) -> None:
        if self.keep and not self.store.put(response, (*self.new_input, convert.turn_of(reply))):
            log.warning("response %s is larger than the whole response store; not kept", response.id)

    def stream(self, exchange: Exchange) -> AsyncIterator[bytes]:
        return stream_reply(exchange, convert.ResponseStream(self.base, self.done))

    async def whole(self, exchange: Exchange) -> ResponseObject:
        reply, finished = await fold_reply(exchange)
        response = convert.finished_response(self.base, reply, finished)
        self.done(response, reply)
        return response
