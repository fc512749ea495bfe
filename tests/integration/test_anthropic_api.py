"""Anthropic's Messages API against a real server and engine, through the official `anthropic` SDK:
`messages.create`, `messages.stream`, a tool round trip, `count_tokens`, and errors as its exception classes.

'qwen' is a tiny random model wearing Qwen2.5's chat template: its calls are forced (tool_choice `any` or
`tool`), so a random model still calls. The demo model writes text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from tests.integration.conftest import StartServer
from tests.support.event_order import check_anthropic_events, named_events
from tests.support.server import ServerProcess

DEMO = "mlx-gateway-demo"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 14}},
                  "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER_SCHEMA}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}  # the SDK 2.x has no sampling arguments: they travel in extra_body


@pytest.fixture(scope="module")
def client(agent_server: ServerProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=agent_server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_create_answers_text_with_anthropics_usage(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=DEMO, max_tokens=40, system="Answer briefly.",
                                     messages=[{"role": "user", "content": "What is a generator?"}],
                                     extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    usage = message.usage
    assert 0 < usage.output_tokens <= 40 and usage.input_tokens + (usage.cache_read_input_tokens or 0) > 5


def test_stream_and_create_agree_and_events_follow_the_documented_order(
    client: anthropic.Anthropic, agent_server: ServerProcess,
) -> None:
    request: dict[str, Any] = {"model": DEMO, "max_tokens": 30, "messages": [{"role": "user", "content": "Lists?"}]}
    whole = client.messages.create(**request, extra_body=GREEDY)
    with client.messages.stream(**request, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    raw = httpx.post(agent_server.base_url + "/v1/messages", json={**request, **GREEDY, "stream": True}, timeout=120)
    message = check_anthropic_events(named_events(raw.text))
    assert message["content"][0]["text"] == text


def test_a_tool_round_trip(client: anthropic.Anthropic) -> None:
    first = client.messages.create(model="qwen", max_tokens=200, messages=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                   tool_choice={"type": "any"}, extra_body=GREEDY)
    assert first.stop_reason == "tool_use"
    uses = [block for block in first.content if block.type == "tool_use"]
    assert uses and all(use.name == "get_weather" and use.id.startswith("toolu_") for use in uses)
    jsonschema.validate(uses[0].input, WEATHER_SCHEMA)
    results = [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 22C"} for use in uses]
    second = client.messages.create(
        model="qwen", max_tokens=10, tools=[WEATHER], extra_body=GREEDY,  # type: ignore[list-item]
        messages=[*ASK, {"role": "assistant", "content": first.content}, {"role": "user", "content": results}],  # type: ignore[list-item]
    )
    assert second.usage.output_tokens > 0
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) > first.usage.input_tokens


def test_a_streamed_forced_tool_call(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="qwen", max_tokens=200, messages=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                tool_choice={"type": "tool", "name": "get_weather",
                                             "disable_parallel_tool_use": True}, extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    (use,) = [block for block in final.content if block.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER_SCHEMA)
    assert final.stop_reason == "tool_use"


def test_count_tokens_is_what_the_same_request_prompts(client: anthropic.Anthropic) -> None:
    for model, extra in ((DEMO, {}), ("qwen", {"tools": [WEATHER], "tool_choice": {"type": "any"}})):
        request: dict[str, Any] = {"model": model, "system": "Be brief.", "messages": ASK, **extra}
        counted = client.messages.count_tokens(**request)
        message = client.messages.create(**request, max_tokens=5, extra_body=GREEDY)
        assert counted.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
        assert counted.input_tokens > 5
    with_tools = client.messages.count_tokens(model="qwen", messages=ASK, tools=[WEATHER])  # type: ignore[list-item]
    without = client.messages.count_tokens(model="qwen", messages=ASK)  # type: ignore[arg-type]
    assert with_tools.input_tokens > without.input_tokens  # the tool definitions are in the prompt


def test_sampling_parameters_in_extra_body(client: anthropic.Anthropic) -> None:
    def sample(**params: Any) -> str:
        message = client.messages.create(model=DEMO, max_tokens=12, messages=ASK, extra_body=params)  # type: ignore[arg-type]
        return message.content[0].text  # type: ignore[union-attr]

    assert sample(top_k=1, temperature=1.0) == sample(top_k=1, temperature=1.0) == sample(temperature=0)
    assert len({sample(temperature=1.0, top_k=50) for _ in range(4)}) > 1


def test_a_stop_sequence_is_named_in_the_stop_reason(client: anthropic.Anthropic) -> None:
    free = client.messages.create(model=DEMO, max_tokens=30, messages=ASK, extra_body=GREEDY).content[0].text  # type: ignore[union-attr]
    stop = free[4:7]
    stopped = client.messages.create(model=DEMO, max_tokens=30, messages=ASK, stop_sequences=[stop],
                                     extra_body=GREEDY)
    assert stopped.content[0].text == free[: free.index(stop)]  # type: ignore[union-attr]
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", stop)


def test_errors_are_the_sdks_exception_classes(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=5, messages=ASK)  # type: ignore[arg-type]
    assert missing.value.type == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as image:
        client.messages.create(model=DEMO, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert image.value.type == "invalid_request_error" and "messages[0].content[0]" in str(image.value)
    with pytest.raises(anthropic.BadRequestError) as no_tools:
        client.messages.create(model="tiny", max_tokens=5, messages=ASK, tools=[WEATHER],  # type: ignore[list-item]
                               tool_choice={"type": "any"})
    assert "does not support tool calling" in str(no_tools.value)


def test_the_api_key_travels_as_x_api_key(start_server: StartServer, agent_models_dir: Any) -> None:
    server = start_server("--models-dir", str(agent_models_dir), "--api-key", "s3cret")
    server.wait_ready()
    with anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            bad.messages.create(model="tiny", max_tokens=3, messages=ASK)  # type: ignore[arg-type]
        assert refused.value.type == "authentication_error"
    with anthropic.Anthropic(base_url=server.base_url, api_key="s3cret", max_retries=0) as good:
        assert good.messages.create(model="tiny", max_tokens=3, messages=ASK).usage.output_tokens > 0  # type: ignore[arg-type]
        assert good.messages.count_tokens(model="tiny", messages=ASK).input_tokens > 0  # type: ignore[arg-type]


def test_metrics_count_these_routes_by_name(client: anthropic.Anthropic, agent_server: ServerProcess) -> None:
    client.messages.count_tokens(model=DEMO, messages=ASK)  # type: ignore[arg-type]
    client.messages.create(model=DEMO, max_tokens=3, messages=ASK)  # type: ignore[arg-type]
    text = httpx.get(agent_server.base_url + "/metrics", timeout=10).text
    for route in ("/v1/messages", "/v1/messages/count_tokens"):
        assert f'mlx_gateway_http_requests_total{{method="POST",route="{route}",status="200"}}' in text, route


@pytest.mark.parametrize("model", ["qwen", "mlx-gateway-demo"])
def test_a_system_message_mid_conversation_and_claude_codes_extras_are_served(client: anthropic.Anthropic,
                                                                              model: str) -> None:
    """What Claude Code sends on every request: a system message after the first user turn, the clear-thinking
    context edit, `$schema` in a tool's input_schema, cache_control, the beta query. Both templates take a
    system turn anywhere (the merge for templates that take one, first, is tests/unit/mlx_backend/engine/tools/
    test_render.py's, on Mistral's real template)."""
    tool = {"name": "get_weather", "description": "The weather in a city", "cache_control": {"type": "ephemeral"},
            "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                             "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    messages: Any = [ASK[0], {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Go."}]
    request: dict[str, Any] = {"model": model, "max_tokens": 5, "system": "Be brief.", "messages": messages,
                               "tools": [tool], "extra_query": {"beta": "true"},
                               "extra_body": {"context_management": {"edits": [
                                   {"type": "clear_thinking_20251015", "keep": "all"}]}}}
    message = client.messages.create(**request)
    assert message.stop_reason in ("end_turn", "max_tokens", "tool_use") and message.usage.input_tokens > 0
    counted = client.messages.count_tokens(model=model, system="Be brief.", messages=messages, tools=[tool])
    assert counted.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
