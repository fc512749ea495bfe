"""SSE framing (gateway/serving/sse.py), and the per-token way a chat stream writes its text (`TextSlot`): the very
bytes that building and encoding each chunk would give."""

from __future__ import annotations

import json

import pytest

from gateway.chat.adapter import ChatRenderer
from gateway.chat.render import ResponseMeta, chat_delta_chunk
from gateway.serving import sse
from mlx_backend.contract import Delta, TokenLogprob, ToolCallDelta

TEXTS = ["tok ", "", " ", 'say "hi"\n', "back\\slash\ttab", "\x00\x1f\x7f", "é ü ß", "日本語", "🦙🦙", "\ud7ff\ue000",
         "</script>", "\u2028\u2029", "\ue000mlx-gateway-text-slot\ue001"]


def test_event_and_named_event_frames() -> None:
    assert sse.event({"a": 1}) == b'data: {"a":1}\n\n'
    assert sse.named_event("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert sse.DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("text", TEXTS)
def test_a_text_slot_gives_the_bytes_encoding_the_payload_gives(text: str) -> None:
    slot = sse.TextSlot.of(lambda t: sse.event({"id": "x", "choices": [{"delta": {"content": t}}], "n": None}))
    assert slot is not None
    assert slot.event(text) == sse.event({"id": "x", "choices": [{"delta": {"content": text}}], "n": None})


def test_no_slot_where_the_text_does_not_show_exactly_once() -> None:
    assert sse.TextSlot.of(lambda t: sse.event({"a": "fixed"})) is None
    assert sse.TextSlot.of(lambda t: sse.event({"a": t, "b": t})) is None


META = ResponseMeta("chatcmpl-abc", "tiny")


def general(delta: Delta, logprobs: bool) -> bytes | None:
    chunk = chat_delta_chunk(META, delta, logprobs)
    return None if chunk is None else sse.event(chunk)


@pytest.mark.parametrize("logprobs", [False, True])
def test_a_chat_renderer_writes_every_delta_as_its_chunk_encodes(logprobs: bool) -> None:
    lp = TokenLogprob("tok", b"tok", -0.5)
    deltas = [Delta("r", t, 1) for t in TEXTS] + [
        Delta("r", "three merged tokens", 3),  # deltas that waited for a slow client, merged
        Delta("r", "second choice", 1, index=1),
        Delta("r", "", 1),  # nothing to send
        Delta("r", "with logprobs", 1, logprobs=(lp,)),
        Delta("r", "", 1, logprobs=(lp,)),
        Delta("r", "", 1, tool_calls=(ToolCallDelta(0, "call_1", "get", '{"a"'),)),
        Delta("r", "text and a call", 2, tool_calls=(ToolCallDelta(0, None, None, ": 1}"),)),
    ]
    renderer = ChatRenderer(logprobs)
    for delta in deltas:
        assert renderer.delta_event(META, delta) == general(delta, logprobs), delta


def test_the_fast_way_is_used_for_plain_text_only() -> None:
    renderer = ChatRenderer(False)
    renderer.delta_event(META, Delta("r", "", 1, tool_calls=(ToolCallDelta(0, "c", "f", "{"),)))
    renderer.delta_event(META, Delta("r", "x", 1, logprobs=(TokenLogprob("x", b"x", -1.0),)))
    assert renderer._text_slots == {}
    renderer.delta_event(META, Delta("r", "x", 1, index=2))
    assert list(renderer._text_slots) == [2]
    written = renderer.delta_event(META, Delta("r", 'a "quote"', 4, index=2))
    assert written is not None
    assert json.loads(written[len(b"data: "):])["choices"][0] == {
        "index": 2, "delta": {"content": 'a "quote"'}, "logprobs": None, "finish_reason": None}
