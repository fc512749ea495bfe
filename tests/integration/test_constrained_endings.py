"""Constrained output always ends, and ends valid (issue 26, issue 20's "forced tool calls end"), through a
real server and the real openai and anthropic clients, in all three APIs, stream and not.

The models are random (a tiny Qwen2.5-dressed model) or the bundled demo model, and the worst cases are made
on purpose: `logit_bias` bans every token holding a quote, a brace or a bracket, so the model itself can never
close a string or an object, and only the grammar's closing reserve can. The same paths on a real trained
model are in test_real_model_constrained.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from mlx_backend.demo import DEMO_MODEL_ID
from tests.support import tiny_models as tm
from tests.support.server import ServerProcess

pytestmark = pytest.mark.slow

CAPITAL = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                   "population_millions": {"type": "number"}},
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tm.make_tiny_model(root / "qwen", chat_format="qwen2.5", context_length=4096)
    return root


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    process = ServerProcess(["--models-dir", str(models), "--demo-model"], log).start()
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def no_closers(models: Path) -> dict[str, int]:
    """logit_bias that bans every token of the Qwen-dressed model holding `"`, `}` or `]`."""
    tokenizer = AutoTokenizer.from_pretrained(str(models / "qwen"))
    return {str(i): -100 for i in range(len(tokenizer)) if any(c in tokenizer.decode([i]) for c in '"}]')}


def streamed_chat(client: openai.OpenAI, **request: Any) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """Content, calls (index -> name and joined arguments) and finish_reason of a streamed chat completion."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"name": "", "arguments": ""})
                call["name"] += piece.function.name or "" if piece.function else ""
                call["arguments"] += piece.function.arguments or "" if piece.function else ""
            finish = choice.finish_reason or finish
    return content, calls, finish


# -- forced calls end --------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["named", "required"])
def test_a_forced_call_on_the_demo_model_ends_with_tool_calls(client: openai.OpenAI, choice: str) -> None:
    request: dict[str, Any] = {"model": DEMO_MODEL_ID, "messages": ASK, "tools": TOOLS, "temperature": 0,
                               "tool_choice": NAMED if choice == "named" else "required", "max_tokens": 300}
    reply = client.chat.completions.create(**request)
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    _, calls, finish = streamed_chat(client, **request)
    assert finish == "tool_calls"
    assert list(calls.values()) == [{"name": "get_weather", "arguments": call.function.arguments}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_cut_by_max_tokens_still_parses_and_says_length(client: openai.OpenAI,
                                                                      no_closers: dict[str, int],
                                                                      stream: bool) -> None:
    request: dict[str, Any] = {"model": "qwen", "messages": ASK, "tools": TOOLS, "tool_choice": NAMED,
                               "max_tokens": 60, "temperature": 0, "logit_bias": no_closers}
    if stream:
        _, calls, finish = streamed_chat(client, **request)
        arguments = calls[0]["arguments"]
    else:
        reply = client.chat.completions.create(**request)
        finish = reply.choices[0].finish_reason
        (call,) = reply.choices[0].message.tool_calls or []
        arguments = call.function.arguments
    assert finish == "length"
    jsonschema.validate(json.loads(arguments), WEATHER)


def test_max_tool_calls_bounds_a_required_reply_in_the_responses_api(client: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": WEATHER},
                  {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {
                      "zone": {"type": "string", "maxLength": 4}}, "required": ["zone"]}}]
    for limit in (1, 2):
        response = client.responses.create(model="qwen", input="Weather and time in Paris?", tools=tools,
                                           tool_choice="required", max_tool_calls=limit, max_output_tokens=400,
                                           temperature=0)
        calls = [item for item in response.output if item.type == "function_call"]
        assert 1 <= len(calls) <= limit
    with pytest.raises(openai.BadRequestError, match="max_tool_calls"):
        client.responses.create(model="qwen", input="hi", tools=tools, max_tool_calls=0)


# -- the closing reserve -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("max_tokens", [48, 80])
def test_strict_json_schema_cut_by_max_tokens_parses_and_validates(client: openai.OpenAI,
                                                                   no_closers: dict[str, int], stream: bool,
                                                                   max_tokens: int) -> None:
    request: dict[str, Any] = {
        "model": "qwen", "max_tokens": max_tokens, "temperature": 0, "logit_bias": no_closers,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL,
                                                                   "strict": True}},
    }
    if stream:
        text, _, finish = streamed_chat(client, **request)
    else:
        reply = client.chat.completions.create(**request)
        text, finish = reply.choices[0].message.content or "", reply.choices[0].finish_reason
    assert finish == "length"
    jsonschema.validate(json.loads(text), CAPITAL)


def test_json_object_mode_ends_and_parses(client: openai.OpenAI, no_closers: dict[str, int]) -> None:
    for model, bias in (("qwen", no_closers), (DEMO_MODEL_ID, {})):
        reply = client.chat.completions.create(model=model, messages=ASK, max_tokens=120, temperature=0,
                                               response_format={"type": "json_object"}, logit_bias=bias)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_text_format_cut_short_still_parses(client: openai.OpenAI, stream: bool) -> None:
    text_format: Any = {"format": {"type": "json_schema", "name": "capital", "schema": CAPITAL, "strict": True}}
    request: dict[str, Any] = {"model": "qwen", "input": "What is the capital of France? Answer in JSON.",
                               "text": text_format, "max_output_tokens": 40, "temperature": 0}
    if stream:
        events = list(client.responses.create(stream=True, **request))
        response = events[-1].response  # type: ignore[union-attr]
    else:
        response = client.responses.create(**request)
    jsonschema.validate(json.loads(response.output_text), CAPITAL)
    assert response.status in ("completed", "incomplete")


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_messages_tool_use_cut_short_has_an_object_input(server: ServerProcess, stream: bool) -> None:
    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)
    request: dict[str, Any] = {
        "model": "qwen", "max_tokens": 40, "messages": ASK,
        "tools": [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    if stream:
        with client.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**request)
    (use,) = [block for block in message.content if block.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER)
    assert message.stop_reason in ("tool_use", "max_tokens")
