"""POST /v1/responses (OpenAI's Responses API) through the real app and the scripted engine."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from litestar.testing import TestClient

from mlx_backend.client.fake import FakeEngine
from mlx_backend.contract import ChatMessage, Constraint, Generate, ReasoningControl, ToolCall, ToolSpec
from mlx_backend.errors import EngineError, EngineErrorCode
from tests.support.event_order import check_responses_events, named_events
from tests.unit.gateway.conftest import ClientFactory
from tests.unit.gateway.test_errors import error_of

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def body(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny", "input": "hi", **overrides}


def calling(*calls: tuple[str, str]) -> FakeEngine:
    """An engine that answers with its usual text, then these calls, whenever the request has tools."""
    def script(command: Generate) -> Sequence[tuple[str, str]]:
        return calls if command.tools else ()
    return FakeEngine(calls=script)


def stream(client: TestClient[Any], **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/responses", json=body(stream=True, **overrides))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return check_responses_events(named_events(response.text))


# -- the response ------------------------------------------------------------------------------------------


def test_a_text_reply_is_a_completed_response_with_one_message(client: TestClient[Any]) -> None:
    response = client.post("/v1/responses", json=body())
    assert response.status_code == 200
    got = response.json()
    assert got["object"] == "response" and got["status"] == "completed" and got["id"].startswith("resp_")
    assert response.headers["x-request-id"] in got["id"]
    (message,) = got["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Hello from the scripted engine. It has nothing "
                                   "to say.", "annotations": [], "logprobs": []}]
    usage = got["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_tokens"] == 10
    assert usage["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert got["error"] is None and got["incomplete_details"] is None and got["tool_choice"] == "auto"


def test_max_output_tokens_ends_an_incomplete_response(client: TestClient[Any]) -> None:
    got = client.post("/v1/responses", json=body(max_output_tokens=3)).json()
    assert got["status"] == "incomplete" and got["incomplete_details"] == {"reason": "max_output_tokens"}
    assert got["output"][0]["status"] == "incomplete"
    assert got["output"][0]["content"][0]["text"] == "Hello from the"
    assert got["max_output_tokens"] == 3


def test_a_function_call_is_an_output_item_after_the_text(make_client: ClientFactory) -> None:
    client = make_client(calling(("get_weather", '{"city": "Paris"}')))
    got = client.post("/v1/responses", json=body(tools=[WEATHER])).json()
    message, call = got["output"]
    assert message["type"] == "message"
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert call["arguments"] == '{"city": "Paris"}' and call["call_id"].startswith("call_")
    assert call["id"] != message["id"] and got["status"] == "completed"
    assert got["tools"] == [{**WEATHER, "strict": True}]  # echoed as applied: strict by default


# -- the stream ---------------------------------------------------------------------------------------------


def test_a_streamed_text_reply_follows_the_documented_event_order(client: TestClient[Any]) -> None:
    final = stream(client)
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"].startswith("Hello from the scripted engine")
    assert final["usage"]["output_tokens"] == 10


def test_a_streamed_call_has_argument_deltas_then_done(make_client: ClientFactory) -> None:
    client = make_client(calling(("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')))
    response = client.post("/v1/responses", json=body(stream=True, tools=[WEATHER]))
    events = named_events(response.text)
    final = check_responses_events(events)
    assert [o["type"] for o in final["output"]] == ["message", "function_call", "function_call"]
    deltas = [d["delta"] for n, d in events if n == "response.function_call_arguments.delta"]
    assert "".join(deltas) == '{"city": "Paris"}{"city": "Rome"}' and len(deltas) > 2
    done = [d for n, d in events if n == "response.function_call_arguments.done"]
    assert [(d["name"], d["arguments"]) for d in done] == [("get_weather", '{"city": "Paris"}'),
                                                          ("get_weather", '{"city": "Rome"}')]


def test_a_stream_cut_by_max_output_tokens_ends_incomplete(client: TestClient[Any]) -> None:
    final = stream(client, max_output_tokens=2)
    assert final["status"] == "incomplete" and final["output"][0]["status"] == "incomplete"


def test_a_failure_after_the_headers_is_response_failed(make_client: ClientFactory) -> None:
    client = make_client(FakeEngine(token_delay_s=0.05), request_timeout_s=0.2)
    final = stream(client)
    assert final["status"] == "failed" and final["error"]["code"] == "server_error"  # the spec's enum
    assert "request timeout" in final["error"]["message"]


# -- the request ---------------------------------------------------------------------------------------------


def test_input_items_become_chat_messages(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    items = [
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather "},
                                                        {"type": "input_text", "text": "in Paris?"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}',
         "id": "fc_1", "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": "22C"},
        {"role": "user", "content": "thanks"},
    ]
    assert client.post("/v1/responses", json=body(input=items, instructions="sys")).status_code == 200
    assert engine.received[-1].messages == (
        ChatMessage("system", "sys"), ChatMessage("system", "be brief"), ChatMessage("user", "weather in Paris?"),
        ChatMessage("assistant", "Checking.", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "22C", tool_call_id="call_1"), ChatMessage("user", "thanks"),
    )


def test_function_tools_reach_the_engine_in_chats_shape_strict_by_default(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    loose = {"type": "function", "name": "f", "strict": False}
    client.post("/v1/responses", json=body(tools=[WEATHER, loose], parallel_tool_calls=False))
    sent = engine.received[-1]
    assert sent.tools == (ToolSpec("get_weather", "Weather in a city", WEATHER["parameters"], strict=True),
                          ToolSpec("f", strict=False))
    assert (sent.tool_choice, sent.tool_choice_name, sent.parallel_tool_calls) == ("auto", None, False)


@pytest.mark.parametrize(("choice", "mode", "name"), [
    ("auto", "auto", None), ("none", "none", None), ("required", "required", None),
    ({"type": "function", "name": "get_weather"}, "function", "get_weather"),
])
def test_tool_choice_maps_onto_the_engine(make_client: ClientFactory, choice: Any, mode: str, name: str | None) -> None:
    engine = FakeEngine()
    make_client(engine).post("/v1/responses", json=body(tools=[WEATHER], tool_choice=choice))
    assert (engine.received[-1].tool_choice, engine.received[-1].tool_choice_name) == (mode, name)


def test_sampling_parameters_reach_the_engine(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    make_client(engine).post("/v1/responses", json=body(temperature=0.5, top_p=0.9, max_output_tokens=7))
    params = engine.received[-1].params
    assert (params.temperature, params.top_p, params.max_tokens) == (0.5, 0.9, 7)


def test_text_format_becomes_the_constraint(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    got = client.post("/v1/responses", json=body(text={"format": fmt})).json()
    assert engine.received[-1].constraint == Constraint("json_schema", json.dumps(schema), True)
    assert got["text"]["format"] == fmt
    client.post("/v1/responses", json=body(text={"format": {"type": "json_object"}}))
    assert engine.received[-1].constraint == Constraint("json_object")
    client.post("/v1/responses", json=body(text={"format": {"type": "text"}}))
    assert engine.received[-1].constraint is None
    none = body(tools=[WEATHER], tool_choice="none", text={"format": {"type": "json_object"}})
    assert client.post("/v1/responses", json=none).status_code == 200  # tools that cannot be called


@pytest.mark.parametrize(("overrides", "param"), [
    ({"tools": [{"type": "computer_use_preview"}]}, "tools[0]"),
    ({"tools": [{"type": "local_shell"}]}, "tools[0]"),
    ({"tools": [{"type": "namespace", "name": "ns", "description": "d", "tools": [{"type": "custom", "name": "c"}]}]},
     "tools[0].tools[0]"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search"}}, "tool_choice"),
    ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
    ({"input": [{"type": "web_search_call", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "x"}]}]}, "input[0].content[0]"),
    ({"background": True}, "background"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"text": {"format": {"type": "json_object"}}, "tools": [WEATHER]}, "text.format"),
    ({"text": {"format": {"type": "json_object"}}, "tools": [{**WEATHER, "strict": False}],
      "tool_choice": "required"}, "text.format"),
])
def test_what_would_change_the_output_is_a_400_naming_it(client: TestClient[Any], overrides: dict[str, Any],
                                                         param: str) -> None:
    error = error_of(client.post("/v1/responses", json=body(**overrides)), 400)
    assert error["param"] == param and error["code"] == "unsupported_parameter", error


@pytest.mark.parametrize(("overrides", "param"), [
    ({"frobnicate": 1}, "frobnicate"),
    ({"input": [{"role": "user", "content": "x", "extra": 1}]}, "input[0].extra"),
    ({"tools": [{**WEATHER, "color": "red"}]}, "tools[0].color"),
])
def test_unknown_fields_are_a_400_naming_them(client: TestClient[Any], overrides: dict[str, Any], param: str) -> None:
    error = error_of(client.post("/v1/responses", json=body(**overrides)), 400)
    assert error["param"] == param and error["code"] == "unsupported_parameter", error


@pytest.mark.parametrize(("overrides", "param"), [
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0]"),
    ({"input": []}, "input"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objekt"}}}}, "text.format.schema"),
    ({"temperature": 3}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_tool_calls": 0}, "max_tool_calls"),
])
def test_invalid_values_are_a_400_naming_them(client: TestClient[Any], overrides: dict[str, Any], param: str) -> None:
    error = error_of(client.post("/v1/responses", json=body(**overrides)), 400)
    assert error["param"] == param, error


def test_harmless_parameters_are_accepted(client: TestClient[Any]) -> None:
    got = client.post("/v1/responses", json=body(
        metadata={"k": "v"}, user="u", safety_identifier="s", prompt_cache_key="p", prompt_cache_retention="24h",
        service_tier="auto", truncation="disabled", store=False, include=["reasoning.encrypted_content"],
        stream_options={"include_obfuscation": False}, reasoning={"effort": None}, background=False,
        text={"format": {"type": "text"}, "verbosity": "medium"}, parallel_tool_calls=True,
    ))
    assert got.status_code == 200, got.text
    assert got.json()["metadata"] == {"k": "v"} and got.json()["store"] is False


def test_max_tool_calls_reaches_the_engine(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    request = body(tools=[WEATHER], tool_choice="required", max_tool_calls=2)
    got = make_client(engine).post("/v1/responses", json=request)
    assert got.status_code == 200, got.text
    assert engine.received[-1].max_tool_calls == 2


def test_an_unknown_model_is_404_in_openais_shape(client: TestClient[Any]) -> None:
    error = error_of(client.post("/v1/responses", json=body(model="nope")), 404)
    assert error["code"] == "model_not_found"


# -- stored responses ---------------------------------------------------------------------------------------


def test_previous_response_id_continues_the_conversation(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    first = client.post("/v1/responses", json=body(input="my name is Ada", instructions="first rules")).json()
    second = client.post("/v1/responses", json=body(input="what is my name?", previous_response_id=first["id"],
                                                     instructions="new rules")).json()
    assert second["previous_response_id"] == first["id"]
    reply = "Hello from the scripted engine. It has nothing to say."
    assert engine.received[-1].messages == (
        ChatMessage("system", "new rules"),  # instructions are never carried over
        ChatMessage("user", "my name is Ada"), ChatMessage("assistant", reply), ChatMessage("user", "what is my name?"),
    )
    client.post("/v1/responses", json=body(input="and now?", previous_response_id=second["id"]))
    assert [m.content for m in engine.received[-1].messages or ()] == [
        "my name is Ada", reply, "what is my name?", reply, "and now?"]


def test_a_function_call_round_trip_by_previous_response_id(make_client: ClientFactory) -> None:
    engine = calling(("get_weather", '{"city": "Paris"}'))
    client = make_client(engine)
    first = client.post("/v1/responses", json=body(input="weather?", tools=[WEATHER], tool_choice="required",
                                                    stream=True))
    final = check_responses_events(named_events(first.text))
    call = final["output"][-1]
    client.post("/v1/responses", json=body(
        previous_response_id=final["id"], tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "22C"}]))
    messages = engine.received[-1].messages or ()
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    assert messages[1].tool_calls == (ToolCall(call["call_id"], "get_weather", '{"city": "Paris"}'),)
    assert messages[2].tool_call_id == call["call_id"]


def test_stored_responses_can_be_read_and_deleted(client: TestClient[Any]) -> None:
    created = client.post("/v1/responses", json=body()).json()
    assert client.get(f"/v1/responses/{created['id']}").json() == created
    deleted = client.delete(f"/v1/responses/{created['id']}")
    assert deleted.status_code == 200 and deleted.json() == {"id": created["id"], "object": "response",
                                                              "deleted": True}
    assert error_of(client.get(f"/v1/responses/{created['id']}"), 404)["code"] == "response_not_found"
    assert error_of(client.delete(f"/v1/responses/{created['id']}"), 404)["code"] == "response_not_found"


def test_store_false_keeps_nothing_and_an_unknown_previous_id_is_a_clear_400(client: TestClient[Any]) -> None:
    created = client.post("/v1/responses", json=body(store=False)).json()
    assert created["store"] is False
    assert error_of(client.get(f"/v1/responses/{created['id']}"), 404)
    error = error_of(client.post("/v1/responses", json=body(previous_response_id=created["id"])), 400)
    assert error["code"] == "previous_response_not_found" and error["param"] == "previous_response_id"
    assert "lost on restart" in error["message"]


def test_a_streamed_response_is_stored_when_it_completes(client: TestClient[Any]) -> None:
    final = stream(client)
    assert client.get(f"/v1/responses/{final['id']}").json() == final


def test_with_the_store_off_responses_say_store_false(make_client: ClientFactory) -> None:
    client = make_client(responses_store_mb=0)
    created = client.post("/v1/responses", json=body()).json()
    assert created["store"] is False
    assert error_of(client.get(f"/v1/responses/{created['id']}"), 404)


def test_options_on_a_stored_response_allows_get_and_delete(client: TestClient[Any]) -> None:
    response = client.options("/v1/responses/resp_x")
    assert response.status_code == 204 and response.headers["allow"] == "DELETE, GET, HEAD, OPTIONS"


# -- what Codex CLI sends by default --------------------------------------------------------------------------

SUB_AGENTS = {"type": "namespace", "name": "multi_agent_v1", "description": "Tools for sub-agents.", "tools": [
    {"type": "function", "name": "spawn_agent", "description": "Start a sub-agent", "strict": False,
     "parameters": {"type": "object", "properties": {"task": {"type": "string"}}}},
    {"type": "function", "name": "close_agent", "parameters": {"type": "object", "properties": {}}},
]}


def test_namespace_tools_offer_their_functions_to_the_model(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    make_client(engine).post("/v1/responses", json=body(tools=[WEATHER, SUB_AGENTS]))
    offered = [t.name for t in engine.received[-1].tools]
    assert offered == ["get_weather", "spawn_agent", "close_agent"]


def test_a_call_to_a_namespace_function_names_its_namespace_as_openai_does(make_client: ClientFactory) -> None:
    client = make_client(calling(("spawn_agent", '{"task": "look"}'), ("get_weather", '{"city": "Paris"}')))
    got = client.post("/v1/responses", json=body(tools=[WEATHER, SUB_AGENTS])).json()
    spawn, weather = [item for item in got["output"] if item["type"] == "function_call"]
    assert (spawn["name"], spawn["namespace"]) == ("spawn_agent", "multi_agent_v1")
    assert weather["name"] == "get_weather" and "namespace" not in weather
    response = make_client(calling(("close_agent", "{}"))).post("/v1/responses", json=body(stream=True,
                                                                                           tools=[SUB_AGENTS]))
    events = named_events(response.text)
    final = check_responses_events(events)
    items = [d["item"] for n, d in events if n in ("response.output_item.added", "response.output_item.done")]
    calls = [item for item in items + final["output"] if item["type"] == "function_call"]
    assert [(c["name"], c["namespace"]) for c in calls] == [("close_agent", "multi_agent_v1")] * 3


def test_a_function_call_item_with_its_namespace_comes_back_as_input(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    make_client(engine).post("/v1/responses", json=body(tools=[SUB_AGENTS], input=[
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "close_agent", "namespace": "multi_agent_v1",
         "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "closed"},
    ]))
    assert engine.received[-1].messages[1].tool_calls == (ToolCall("c1", "close_agent", "{}"),)  # type: ignore[index]


def test_hosted_tools_are_declared_but_not_offered(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    hosted = [{"type": "web_search", "external_web_access": False}, {"type": "file_search", "vector_store_ids": ["v"]}]
    response = client.post("/v1/responses", json=body(tools=[*hosted, WEATHER]))
    assert response.status_code == 200, response.text
    assert [t.name for t in engine.received[-1].tools] == ["get_weather"]
    assert response.json()["tools"][0] == hosted[0]  # echoed as sent
    alone = client.post("/v1/responses", json=body(tools=hosted))
    assert alone.status_code == 200 and engine.received[-1].tools == ()


def test_codex_default_request_fields_are_accepted(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    response = make_client(engine).post("/v1/responses", json=body(
        input=[{"type": "message", "id": "msg_1", "role": "developer", "content": [{"type": "input_text",
                                                                                     "text": "Be brief."}]},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "say hi"}]}],
        client_metadata={"session_id": "s", "x-codex-turn-metadata": "{}"}, store=False,
        include=["reasoning.encrypted_content"], prompt_cache_key="s", stream=False, tool_choice="auto",
        parallel_tool_calls=True, tools=[SUB_AGENTS, {"type": "web_search", "external_web_access": False}],
    ))
    assert response.status_code == 200, response.text
    assert engine.received[-1].messages == (ChatMessage("system", "Be brief."), ChatMessage("user", "say hi"))


def test_an_engine_error_about_the_messages_names_input(make_client: ClientFactory) -> None:
    client = make_client(FakeEngine(context_length=5))
    error = error_of(client.post("/v1/responses", json=body(input="one two three four five six seven")), 400)
    assert error["param"] == "input" and error["code"] == "context_length_exceeded"


@pytest.mark.parametrize(("param", "message", "named", "says"), [
    ("messages", "The model's chat template rejected the messages: roles must alternate", "input",
     "rejected the input: roles"),
    ("messages[2].tool_calls[0].function.arguments", "messages[2].tool_calls[0].function.arguments is not valid "
     "JSON: Expecting value", "input", "input (a function_call item's arguments) is not valid JSON"),
    ("response_format", "response_format cannot be combined with a forced or strict tool call", "text.format",
     "text.format cannot be combined"),
    ("tools", "The model 'tiny' does not support tool calling", "tools", "does not support tool calling"),
])
def test_engine_errors_name_the_fields_of_the_responses_api(make_client: ClientFactory, param: str, message: str,
                                                            named: str, says: str) -> None:
    client = make_client(FakeEngine(failures={"tiny": EngineError(EngineErrorCode.INVALID_REQUEST, message,
                                                                   param)}))
    error = error_of(client.post("/v1/responses", json=body()), 400)
    assert error["param"] == named and says in error["message"], error


# -- reasoning ------------------------------------------------------------------------------------------------


def test_reasoning_effort_and_summary_are_accepted_and_echoed(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    got = make_client(engine).post("/v1/responses", json=body(reasoning={"effort": "low", "summary": "auto"}))
    assert got.status_code == 200, got.text
    assert got.json()["reasoning"] == {"effort": "low", "summary": "auto"}
    assert engine.received[-1].reasoning == ReasoningControl(enabled=True, effort="low")
    make_client(engine).post("/v1/responses", json=body(reasoning={"effort": "none"}))
    assert engine.received[-1].reasoning == ReasoningControl(enabled=False)


@pytest.mark.parametrize(("overrides", "param"), [
    ({"reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"reasoning": {"summary": "verbose"}}, "reasoning.summary"),
])
def test_a_reasoning_control_that_makes_no_sense_is_a_400_naming_it(client: TestClient[Any],
                                                                    overrides: dict[str, Any], param: str) -> None:
    error = error_of(client.post("/v1/responses", json=body(**overrides)), 400)
    assert error["param"] == param, error


def test_reasoning_items_in_the_input_go_to_the_assistant_turn_they_precede(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    items = [
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None,
         "content": [{"type": "reasoning_text", "text": "Call the tool."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Summed up."}]},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "thanks"},
    ]
    assert make_client(engine).post("/v1/responses", json=body(input=items, tools=[WEATHER])).status_code == 200
    sent = engine.received[-1].messages or ()
    assert [(m.role, m.reasoning) for m in sent] == [
        ("user", None), ("assistant", "Call the tool."), ("tool", None), ("assistant", "Summed up."), ("user", None)]
    assert sent[1].tool_calls[0].name == "get_weather"
