"""POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API) through the real app and the
scripted engine; every error of these routes in Anthropic's shape."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from litestar.testing import TestClient

from mlx_backend.client.engine import EngineState
from mlx_backend.client.fake import FakeEngine
from mlx_backend.contract import ChatMessage, Constraint, Generate, ReasoningControl, ToolCall, ToolSpec
from mlx_backend.errors import EngineError, EngineErrorCode
from tests.support.event_order import check_anthropic_events, named_events
from tests.unit.gateway.conftest import ClientFactory

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
REPLY = "Hello from the scripted engine. It has nothing to say."


def body(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **overrides}


def calling(*calls: tuple[str, str], text: str = REPLY) -> FakeEngine:
    def script(command: Generate) -> Sequence[tuple[str, str]]:
        return calls if command.tools else ()
    return FakeEngine(reply=lambda _: text, calls=script)


def anthropic_error(response: Any, status: int, kind: str) -> str:
    """The error body is Anthropic's: {"type": "error", "error": {"type", "message"}, "request_id"}."""
    assert response.status_code == status, response.text
    got = response.json()
    assert got["type"] == "error" and set(got["error"]) == {"type", "message"}, got
    assert got["error"]["type"] == kind, got
    assert got["request_id"] == response.headers["x-request-id"]
    return str(got["error"]["message"])


def stream(client: TestClient[Any], **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/messages", json=body(stream=True, **overrides))
    assert response.status_code == 200, response.text
    return check_anthropic_events(named_events(response.text))


# -- the message -------------------------------------------------------------------------------------------


def test_a_text_reply_is_a_message_with_one_text_block(client: TestClient[Any]) -> None:
    response = client.post("/v1/messages", json=body())
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["type"] == "message" and got["role"] == "assistant" and got["id"].startswith("msg_")
    assert got["content"] == [{"type": "text", "text": REPLY, "citations": None}]
    assert (got["stop_reason"], got["stop_sequence"]) == ("end_turn", None)
    assert got["usage"] == {"input_tokens": 1, "output_tokens": 10, "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0, "cache_creation": None, "inference_geo": None,
                            "output_tokens_details": None, "server_tool_use": None, "service_tier": None,
                            "speed": None}


def test_max_tokens_and_stop_sequences_give_their_stop_reasons(client: TestClient[Any]) -> None:
    cut = client.post("/v1/messages", json=body(max_tokens=3)).json()
    assert cut["stop_reason"] == "max_tokens" and cut["content"][0]["text"] == "Hello from the"
    stopped = client.post("/v1/messages", json=body(stop_sequences=["nothing", "scripted"])).json()
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "scripted")
    assert stopped["content"][0]["text"].strip() == "Hello from the"


def test_a_tool_call_is_a_tool_use_block_with_its_input_object(make_client: ClientFactory) -> None:
    client = make_client(calling(("get_weather", '{"city": "Paris"}'), text=""))
    got = client.post("/v1/messages", json=body(tools=[WEATHER], tool_choice={"type": "any"})).json()
    (call,) = got["content"]
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_") and call["name"] == "get_weather"
    assert call["input"] == {"city": "Paris"} and got["stop_reason"] == "tool_use"


# -- the stream ---------------------------------------------------------------------------------------------


def test_a_streamed_reply_follows_the_documented_event_order(client: TestClient[Any]) -> None:
    message = stream(client)
    assert message["content"] == [{"type": "text", "text": REPLY, "citations": None}]
    assert message["stop_reason"] == "end_turn" and message["usage"]["output_tokens"] == 10
    assert message["usage"]["input_tokens"] == 1


def test_a_streamed_tool_call_sends_input_json_deltas(make_client: ClientFactory) -> None:
    client = make_client(calling(("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')))
    response = client.post("/v1/messages", json=body(stream=True, tools=[WEATHER]))
    events = named_events(response.text)
    message = check_anthropic_events(events)
    assert [b["type"] for b in message["content"]] == ["text", "tool_use", "tool_use"]
    assert [b["input"] for b in message["content"][1:]] == [{"city": "Paris"}, {"city": "Rome"}]
    assert message["stop_reason"] == "tool_use"
    assert sum(1 for n, d in events if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta") > 2


def test_a_failure_after_the_headers_is_an_error_event(make_client: ClientFactory) -> None:
    client = make_client(FakeEngine(token_delay_s=0.05), request_timeout_s=0.2)
    message = stream(client)
    assert message["error"]["type"] == "timeout_error"


# -- the request ---------------------------------------------------------------------------------------------


def test_messages_tool_use_and_tool_result_become_chat_messages(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "user", "content": [{"type": "text", "text": "and quickly", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "22C"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "no such city"}],
             "is_error": True},
            {"type": "text", "text": "thanks"}]},
    ]
    system = [{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}]
    assert client.post("/v1/messages", json=body(messages=messages, system=system)).status_code == 200
    assert engine.received[-1].messages == (
        ChatMessage("system", "be brief\n\nbe kind"),
        ChatMessage("user", "weather in Paris?\n\nand quickly"),  # consecutive turns of a role are combined
        ChatMessage("assistant", "Checking.", tool_calls=(ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "22C", tool_call_id="toolu_1"),
        ChatMessage("tool", "Error: no such city", tool_call_id="toolu_2"),
        ChatMessage("user", "thanks"),
    )


def test_a_tool_round_trip_keeps_the_ids_the_reply_gave(make_client: ClientFactory) -> None:
    engine = calling(("get_weather", '{"city": "Paris"}'), text="")
    client = make_client(engine)
    first = client.post("/v1/messages", json=body(tools=[WEATHER], tool_choice={"type": "any"})).json()
    call = first["content"][0]
    client.post("/v1/messages", json=body(tools=[WEATHER], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "22C"}]},
    ]))
    _, assistant, tool = engine.received[-1].messages or ()
    assert assistant.tool_calls[0].id == call["id"] == tool.tool_call_id


@pytest.mark.parametrize(("choice", "mode", "name", "parallel"), [
    (None, "auto", None, True),
    ({"type": "auto"}, "auto", None, True),
    ({"type": "any"}, "required", None, True),
    ({"type": "any", "disable_parallel_tool_use": True}, "required", None, False),
    ({"type": "tool", "name": "get_weather"}, "function", "get_weather", True),
    ({"type": "none"}, "none", None, True),
])
def test_tool_choice_maps_onto_the_engine(make_client: ClientFactory, choice: Any, mode: str, name: str | None,
                                          parallel: bool) -> None:
    engine = FakeEngine()
    extra = {"tool_choice": choice} if choice is not None else {}
    make_client(engine).post("/v1/messages", json=body(tools=[WEATHER], **extra))
    sent = engine.received[-1]
    assert (sent.tool_choice, sent.tool_choice_name, sent.parallel_tool_calls) == (mode, name, parallel)
    assert sent.tools == (ToolSpec("get_weather", "Weather in a city", WEATHER["input_schema"]),)


def test_sampling_parameters_top_k_included_reach_the_engine(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    make_client(engine).post("/v1/messages", json=body(temperature=0.5, top_p=0.9, top_k=40, max_tokens=7,
                                                       stop_sequences=["\n\nHuman:"]))
    params = engine.received[-1].params
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.5, 0.9, 40, 7)
    assert params.stop == ("\n\nHuman:",)


def test_output_config_format_is_a_strict_schema_constraint(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    make_client(engine).post("/v1/messages", json=body(output_config={"format": {"type": "json_schema",
                                                                                 "schema": schema}}))
    assert engine.received[-1].constraint == Constraint("json_schema", json.dumps(schema), True)


def test_harmless_parameters_are_accepted(client: TestClient[Any]) -> None:
    response = client.post("/v1/messages", json=body(
        metadata={"user_id": "u1"}, service_tier="auto", cache_control={"type": "ephemeral"}, speed="standard",
        thinking={"type": "disabled"}, inference_geo="us",
    ), headers={"anthropic-version": "2023-06-01", "anthropic-beta": "something"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("overrides", "named"), [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is ("}]},
     "messages"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"tools": [WEATHER, {"type": "bash_20250124", "name": "bash"}]}, "tools[1]"),
    ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
    ({"container": "c1"}, "container"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}, "tools": [WEATHER],
      "tool_choice": {"type": "any"}}, "output_config.format"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"tools": [{**WEATHER, "input_examples": [{}]}]}, "tools[0].input_examples"),
])
def test_what_we_cannot_honour_is_an_invalid_request_naming_it(client: TestClient[Any], overrides: dict[str, Any],
                                                               named: str) -> None:
    message = anthropic_error(client.post("/v1/messages", json=body(**overrides)), 400, "invalid_request_error")
    assert named in message, message


@pytest.mark.parametrize(("overrides", "named"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": [{"type": "tool_result",
                                                                                     "tool_use_id": "t"}]}]},
     "messages[1].content[0]"),
    ({"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}, "context_management.edits[0]"),
    ({"context_management": {"clear": True}}, "context_management"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"stop_sequences": [""]}, "stop"),
])
def test_invalid_values_are_an_invalid_request_error(client: TestClient[Any], overrides: dict[str, Any],
                                                     named: str) -> None:
    request = {k: v for k, v in body(**overrides).items() if v is not None}
    message = anthropic_error(client.post("/v1/messages", json=request), 400, "invalid_request_error")
    assert named in message, message


# -- errors in Anthropic's shape ----------------------------------------------------------------------------


def test_an_unknown_model_is_not_found_error(client: TestClient[Any]) -> None:
    assert "nope" in anthropic_error(client.post("/v1/messages", json=body(model="nope")), 404, "not_found_error")


def test_the_api_key_is_read_from_x_api_key_and_a_wrong_one_is_authentication_error(
    make_client: ClientFactory,
) -> None:
    client = make_client(api_key="s3cret")
    anthropic_error(client.post("/v1/messages", json=body()), 401, "authentication_error")
    response = client.post("/v1/messages", json=body(), headers={"x-api-key": "wrong"})
    anthropic_error(response, 401, "authentication_error")
    assert "www-authenticate" not in response.headers
    assert client.post("/v1/messages", json=body(), headers={"x-api-key": "s3cret"}).status_code == 200
    count = {"model": "tiny", "messages": body()["messages"]}
    anthropic_error(client.post("/v1/messages/count_tokens", json=count), 401, "authentication_error")


def test_body_and_content_type_errors(make_client: ClientFactory) -> None:
    client = make_client(max_body_bytes=2000)
    big = body(messages=[{"role": "user", "content": "x" * 5000}])
    anthropic_error(client.post("/v1/messages", json=big), 413, "request_too_large")
    anthropic_error(client.post("/v1/messages", content=b"{}", headers={"content-type": "text/plain"}), 415,
                    "invalid_request_error")
    anthropic_error(client.post("/v1/messages", content=b"{nope", headers={"content-type": "application/json"}),
                    400, "invalid_request_error")


def test_an_engine_that_is_down_is_overloaded_error_with_retry_after(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    engine.state = EngineState.RESTARTING
    response = client.post("/v1/messages", json=body())
    anthropic_error(response, 503, "overloaded_error")
    assert response.headers["retry-after"] == "2"
    count = {"model": "tiny", "messages": body()["messages"]}
    anthropic_error(client.post("/v1/messages/count_tokens", json=count), 503, "overloaded_error")


def test_a_model_that_fails_to_load_is_api_error(make_client: ClientFactory) -> None:
    failure = EngineError(EngineErrorCode.MODEL_LOAD_FAILED, "The model 'tiny' could not be loaded: broken.")
    client = make_client(FakeEngine(failures={"tiny": failure}))
    assert "broken" in anthropic_error(client.post("/v1/messages", json=body()), 500, "api_error")


def test_an_internal_error_is_api_error_naming_the_request_id(make_client: ClientFactory,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("gateway.messages.convert.message", explode)
    response = make_client().post("/v1/messages", json=body(), headers={"x-request-id": "req-xyz"})
    message = anthropic_error(response, 500, "api_error")
    assert "req-xyz" in message and "boom" not in message


def test_the_openai_routes_keep_openais_shape(client: TestClient[Any]) -> None:
    got = client.post("/v1/chat/completions", json={"model": "tiny", "messages": []}).json()
    assert set(got) == {"error"} and got["error"]["type"] == "invalid_request_error"


# -- count_tokens ------------------------------------------------------------------------------------------


def test_count_tokens_counts_what_the_same_request_prompts(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    request = {"model": "tiny", "system": "be brief", "messages": [{"role": "user", "content": "one two three"}],
               "tools": [WEATHER], "tool_choice": {"type": "auto"}}
    counted = client.post("/v1/messages/count_tokens", json=request)
    assert counted.status_code == 200 and counted.json() == {"input_tokens": 5}
    created = client.post("/v1/messages", json={**request, "max_tokens": 5}).json()
    assert created["usage"]["input_tokens"] + created["usage"]["cache_read_input_tokens"] == 5
    assert engine.counted[-1].messages == engine.received[-1].messages
    assert engine.counted[-1].tools == engine.received[-1].tools


def test_count_tokens_errors_are_anthropic_shaped(client: TestClient[Any]) -> None:
    anthropic_error(client.post("/v1/messages/count_tokens", json={"model": "nope", "messages": body()["messages"]}),
                    404, "not_found_error")
    anthropic_error(client.post("/v1/messages/count_tokens", json={"model": "tiny", "messages": []}), 400,
                    "invalid_request_error")
    anthropic_error(client.post("/v1/messages/count_tokens", json={"model": "tiny", "max_tokens": 3,
                                                                  "messages": body()["messages"]}),
                    400, "invalid_request_error")


def test_every_error_kind_has_an_anthropic_type_and_the_docs_say_which() -> None:
    from pathlib import Path

    from gateway.errors import ANTHROPIC_TYPES, ErrorKind, GatewayError

    doc = (Path(__file__).resolve().parents[4] / "docs" / "api.md").read_text()
    for kind in ErrorKind:
        spec = kind.value
        anthropic = GatewayError(kind, "m").anthropic_type
        assert anthropic == ANTHROPIC_TYPES[spec.status]
        retry = "yes" if spec.retry_after_s is not None else ""
        assert f"| {spec.status} | `{spec.type}` | `{spec.code}` | {retry} | `{anthropic}` |" in doc, kind


# -- what Claude Code sends by default ------------------------------------------------------------------------


def test_a_system_message_in_the_conversation_stays_where_it_is(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    response = make_client(engine).post("/v1/messages", json=body(system="You help.", messages=[
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "Mind the tests.", "cache_control":
                                        {"type": "ephemeral"}}]},
        {"role": "user", "content": "go on"},
    ]))
    assert response.status_code == 200, response.text
    assert engine.received[-1].messages == (ChatMessage("system", "You help."), ChatMessage("user", "hi"),
                                            ChatMessage("system", "Mind the tests."), ChatMessage("user", "go on"))


def test_claude_code_default_request_fields_are_accepted(make_client: ClientFactory) -> None:
    tool = {**WEATHER, "input_schema": {**WEATHER["input_schema"],  # type: ignore[dict-item]
                                        "$schema": "http://json-schema.org/draft-07/schema#"},
            "cache_control": {"type": "ephemeral"}}
    response = make_client(FakeEngine()).post("/v1/messages?beta=true", json=body(
        max_tokens=32000, stream=False, metadata={"user_id": "user_x_account__session_y"}, tools=[tool],
        context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        system=[{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
    ), headers={"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219,context-management-"
                "2025-06-27,mid-conversation-system-2026-04-07", "x-app": "cli"})
    assert response.status_code == 200, response.text


# -- thinking ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "control"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 8}}, ReasoningControl(enabled=True, budget_tokens=8)),
    ({"thinking": {"type": "enabled", "budget_tokens": 8.0}}, ReasoningControl(enabled=True, budget_tokens=8)),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}},
     ReasoningControl(enabled=True, effort="high")),
    ({"thinking": {"type": "disabled"}}, ReasoningControl(enabled=False)),
    ({"output_config": {"effort": "low"}}, ReasoningControl(enabled=True, effort="low")),
])
def test_thinking_and_effort_reach_the_engine_as_a_control(make_client: ClientFactory, overrides: dict[str, Any],
                                                           control: ReasoningControl) -> None:
    engine = FakeEngine()
    response = make_client(engine).post("/v1/messages", json=body(**overrides))
    assert response.status_code == 200, response.text
    assert engine.received[-1].reasoning == control


@pytest.mark.parametrize(("overrides", "named"), [
    ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 8.5}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 64}, "max_tokens": 64}, "thinking.budget_tokens"),
    ({"thinking": {"type": "sometimes"}}, "thinking.type"),
    ({"thinking": {"type": "adaptive", "display": "omitted"}}, "thinking.display"),
    ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
])
def test_a_thinking_control_that_makes_no_sense_is_a_400_naming_it(client: TestClient[Any],
                                                                   overrides: dict[str, Any], named: str) -> None:
    message = anthropic_error(client.post("/v1/messages", json=body(**overrides)), 400, "invalid_request_error")
    assert named in message, message


def test_thinking_blocks_in_the_history_go_to_their_turn_and_redacted_ones_are_dropped(
        make_client: ClientFactory) -> None:
    engine = FakeEngine()
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hm.", "signature": "sig"},
                                          {"type": "redacted_thinking", "data": "opaque"},
                                          {"type": "text", "text": "A."}]},
        {"role": "user", "content": "go on"},
    ]
    assert make_client(engine).post("/v1/messages", json=body(messages=messages)).status_code == 200
    sent = engine.received[-1].messages or ()
    assert [(m.role, m.content, m.reasoning) for m in sent] == [
        ("user", "q", None), ("assistant", "A.", "Hm."), ("user", "go on", None)]


def test_engine_errors_name_the_fields_of_the_messages_api(make_client: ClientFactory) -> None:
    failure = EngineError(EngineErrorCode.INVALID_REQUEST, "response_format cannot be combined with a forced or "
                          "strict tool call; send one of them.", "response_format")
    client = make_client(FakeEngine(failures={"tiny": failure}))
    message = anthropic_error(client.post("/v1/messages", json=body()), 400, "invalid_request_error")
    assert message.startswith("output_config.format cannot be combined"), message
    too_long = make_client(FakeEngine(context_length=3))
    message = anthropic_error(too_long.post("/v1/messages", json=body(messages=[{"role": "user", "content":
                                                                                 "one two three four"}])),
                              400, "invalid_request_error")
    assert message.startswith("messages: "), message  # Anthropic's error has no param: the message names it
