"""The IPC fields tool calling adds: they cross the socket intact and cost nothing when unused."""

from __future__ import annotations

import msgspec

from mlx_backend.contract import (
    ChatMessage,
    Command,
    Delta,
    Event,
    Generate,
    SamplingParams,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
)


def test_tool_fields_round_trip() -> None:
    generate = Generate(
        "r1", "m", SamplingParams(8),
        messages=(ChatMessage("user", "Weather?"),
                  ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),)),
                  ChatMessage("tool", "rain", tool_call_id="call_1")),
        tools=(ToolSpec("get_weather"), ToolSpec("f", "does f", {"type": "object"}, strict=True)),
        tool_choice="function", tool_choice_name="get_weather", parallel_tool_calls=False,
    )
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(generate), type=Command) == generate
    delta = Delta("r1", "", 3, tool_calls=(ToolCallDelta(0, "call_x", "get_weather", '{"ci'),
                                          ToolCallDelta(0, arguments='ty": "Oslo"}')))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(delta), type=Event) == delta


def test_a_request_without_tools_encodes_as_before() -> None:
    plain = Generate("r1", "m", SamplingParams(8), messages=(ChatMessage("user", "hi"),))
    encoded = msgspec.msgpack.decode(msgspec.msgpack.encode(plain))
    assert not {"tools", "tool_choice", "tool_choice_name", "parallel_tool_calls"} & set(encoded)
    assert "tool_calls" not in encoded["messages"][0]
