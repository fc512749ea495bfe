"""Tool calling, structured output, logprobs and n against a real server, through the real openai and
langchain-openai clients (issue 9): on the bundled demo model and on tiny models dressed as three real
families (Qwen2.5 `<tool_call>`, Llama 3.1 JSON, Mistral `[TOOL_CALLS]`), whose weights are random, so
every call here is forced by constrained decoding and must still validate against its schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from mlx_backend.demo import DEMO_MODEL_ID
from tests.support import tiny_models as tm
from tests.support.server import ServerProcess

pytestmark = pytest.mark.slow

FAMILIES = {"qwen": "qwen2.5", "llama": "llama3.1", "mistral": "mistral"}
# Bounded values: a random model decoding greedily can loop inside an unbounded string or number.
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The time somewhere",
                                      "parameters": {"type": "object", "properties": {
                                          "zone": {"type": "string", "maxLength": 8}},
                                          "required": ["zone"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("families")
    for name, chat_format in FAMILIES.items():
        tm.make_tiny_model(root / name, chat_format=chat_format, context_length=4096)  # type: ignore[arg-type]
    tm.make_tiny_model(root / "notools")  # the tiny word-level model: its template ignores tools
    tm.remove_chat_template(tm.copy_model(root / "notools", root / "plain"))
    log = tmp_path_factory.mktemp("logs") / "server.log"
    process = ServerProcess(["--models-dir", str(root), "--demo-model"], log).start()
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def check_call(call: Any, tools: list[dict[str, Any]] = TOOLS) -> dict[str, Any]:
    """A call names one of the tools and its arguments validate against that tool's schema."""
    (tool,) = [t["function"] for t in tools if t["function"]["name"] == call.function.name]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["parameters"])
    assert call.id.startswith("call_") and call.type == "function"
    return arguments  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", [*FAMILIES, DEMO_MODEL_ID])
def test_a_required_call_comes_back_as_tool_calls_whose_arguments_validate(client: openai.OpenAI,
                                                                          model: str) -> None:
    # One call: with parallel calls allowed, random weights may keep adding calls until max_tokens.
    reply = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                           parallel_tool_calls=False, max_tokens=300, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls or []) == 1
    check_call(choice.message.tool_calls[0])  # type: ignore[index]
    assert not choice.message.content  # markup never leaks into the content


@pytest.mark.parametrize("model", ["qwen", "mistral"])
def test_parallel_calls_each_validate(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                           max_tokens=300, temperature=1.0, seed=4)
    calls = reply.choices[0].message.tool_calls or []
    assert calls
    finished = reply.choices[0].finish_reason == "tool_calls"
    for call in calls if finished else calls[:-1]:  # cut by max_tokens, the last call may be incomplete
        check_call(call)


@pytest.mark.parametrize("model", [*FAMILIES, DEMO_MODEL_ID])
def test_a_named_call_streams_as_argument_pieces_that_assemble_into_valid_json(client: openai.OpenAI,
                                                                             model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, max_tokens=300, temperature=0.7, seed=1, stream=True,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
    )
    pieces = [d for chunk in stream for c in chunk.choices for d in (c.delta.tool_calls or [])]
    first, *rest = pieces
    assert first.index == 0 and first.id and first.type == "function" and first.function
    assert first.function.name == "get_weather" and first.function.arguments  # never an empty start
    assert all(p.id is None and p.function and p.function.name is None for p in rest)
    arguments = first.function.arguments + "".join(p.function.arguments or "" for p in rest)  # type: ignore[union-attr]
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)


def test_the_sdk_stream_helper_assembles_the_same_calls(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model="qwen", messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                        max_tokens=300, temperature=0, parallel_tool_calls=False) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    check_call(call)


def test_no_parallel_calls_means_exactly_one(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                               parallel_tool_calls=False, max_tokens=300, temperature=1.0,
                                               seed=seed)
        assert len(reply.choices[0].message.tool_calls or []) == 1


def test_tool_choice_none_never_calls_and_a_tool_round_trip_is_served(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, tool_choice="none",  # type: ignore[arg-type]
                                           max_tokens=20, temperature=0)
    assert not reply.choices[0].message.tool_calls and reply.choices[0].finish_reason in ("stop", "length")
    first = client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                           max_tokens=300, temperature=0)
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    second = client.chat.completions.create(model="qwen", messages=history, tools=TOOLS, max_tokens=10)  # type: ignore[arg-type]
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert (second.usage.prompt_tokens if second.usage else 0) > (first.usage.prompt_tokens if first.usage else 0)


@pytest.mark.parametrize("model", ["notools", "plain"])
def test_a_model_whose_template_has_no_tool_support_is_a_400_naming_it(client: openai.OpenAI,
                                                                      model: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=5)  # type: ignore[arg-type]
    assert f"'{model}' does not support tool calling" in str(refused.value)


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]
    days: int = pydantic.Field(ge=1, le=7)
    tags: list[Literal["rain", "sun", "wind"]] = pydantic.Field(max_length=3)


@pytest.mark.parametrize("model", [DEMO_MODEL_ID, "qwen"])
def test_the_sdk_parse_helper_returns_a_parsed_object(client: openai.OpenAI, model: str) -> None:
    for seed in range(3):
        reply = client.chat.completions.parse(model=model, messages=ASK, response_format=Weather,  # type: ignore[arg-type]
                                              max_tokens=400, temperature=1.0, seed=seed)
        assert isinstance(reply.choices[0].message.parsed, Weather)
        assert reply.choices[0].finish_reason == "stop"


def test_json_object_mode_gives_a_json_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=DEMO_MODEL_ID, messages=ASK, max_tokens=300, seed=3,
                                           response_format={"type": "json_object"})
    choice = reply.choices[0]
    if choice.finish_reason == "stop":  # a random walk through JSON may run out of tokens first
        assert isinstance(json.loads(choice.message.content or ""), dict)
    assert (choice.message.content or "").startswith("{")


def test_a_schema_that_cannot_be_enforced_is_a_400_before_any_compute(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=DEMO_MODEL_ID, messages=ASK, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {"type": "objekt"}}})
    assert "objekt" in str(refused.value)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_come_per_token_with_the_asked_rivals(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(model=DEMO_MODEL_ID, messages=ASK, max_tokens=12, temperature=0,
                                  logprobs=True, top_logprobs=3)
    if stream:
        entries = [e for chunk in client.chat.completions.create(stream=True, **kwargs)
                   for c in chunk.choices if c.logprobs for e in (c.logprobs.content or [])]
        text = None
    else:
        reply = client.chat.completions.create(**kwargs)
        entries = reply.choices[0].logprobs.content or []  # type: ignore[union-attr]
        text = reply.choices[0].message.content
    assert entries and all(len(e.top_logprobs) == 3 for e in entries)
    for entry in entries:  # greedy: the chosen token is the most likely one
        assert entry.logprob == entry.top_logprobs[0].logprob and entry.bytes == entry.top_logprobs[0].bytes
    if text is not None:
        assert b"".join(bytes(e.bytes or []) for e in entries).decode() == text


def test_legacy_completions_give_logprobs_in_their_own_shape(server: ServerProcess) -> None:
    body = {"model": DEMO_MODEL_ID, "prompt": "A list is", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    choice = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) > 0
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"][0] == 0 and all(len(t) == 2 for t in logprobs["top_logprobs"])


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_come_with_their_indexes_and_usage_counts_them_all(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(model=DEMO_MODEL_ID, messages=ASK, max_tokens=10, temperature=1.0, seed=5, n=3)
    if stream:
        texts = {0: "", 1: "", 2: ""}
        finishes: dict[int, str] = {}
        usage = None
        for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
            usage = chunk.usage or usage
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                if c.finish_reason:
                    finishes[c.index] = c.finish_reason
        assert sorted(finishes) == [0, 1, 2]
    else:
        reply = client.chat.completions.create(**kwargs)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        texts = {c.index: c.message.content or "" for c in reply.choices}
        usage = reply.usage
    assert len(set(texts.values())) > 1  # seed, seed + 1, seed + 2
    assert usage is not None and usage.completion_tokens <= 30 and usage.completion_tokens > 10


def test_harmless_openai_fields_are_accepted(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEMO_MODEL_ID, messages=ASK, max_tokens=3, store=False, metadata={"k": "v"},
        service_tier="auto", prompt_cache_key="abc", safety_identifier="user-1", user="u", verbosity="low")
    assert reply.choices[0].message.content is not None


# -- LangChain ------------------------------------------------------------------------------------------


def chat_model(server: ServerProcess, model: str = DEMO_MODEL_ID, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model=model, max_retries=0,  # type: ignore[arg-type]
                      max_tokens=400, **kwargs)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_a_model_instance(server: ServerProcess, method: str) -> None:
    structured = chat_model(server, temperature=1.0, seed=2).with_structured_output(Weather, method=method)
    result = structured.invoke("What is the weather in Paris?")
    assert isinstance(result, Weather)


@pytest.mark.parametrize("tool_choice", ["get_weather", "any", "required"])
def test_langchain_bind_tools_returns_valid_tool_calls(server: ServerProcess, tool_choice: str) -> None:
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather in a city.

        Args:
            city: the city
            unit: the unit
        """
        return "sunny"

    model = chat_model(server, temperature=0)
    message = model.bind_tools([get_weather], tool_choice=tool_choice).invoke("What is the weather in Paris?")
    assert message.tool_calls  # parallel calls allowed: random weights may make several, each valid
    assert all(c["name"] == "get_weather" and set(c["args"]) == {"city", "unit"} for c in message.tool_calls)
    bound = model.bind_tools([get_weather], tool_choice=tool_choice, parallel_tool_calls=False)
    (call,) = bound.invoke("What is the weather in Paris?").tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    streamed = None
    for chunk in bound.stream("What is the weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.tool_calls[0]["name"] == "get_weather"
    assert set(streamed.tool_calls[0]["args"]) == {"city", "unit"}


def test_the_demo_model_folder_keeps_its_trained_chat_format(server: ServerProcess) -> None:
    """The template grew tool support; a chat without tools must render exactly as the model was trained."""
    template = json.loads((Path(__file__).parents[2] / "mlx_backend/demo/model/tokenizer_config.json")
                          .read_text())["chat_template"]
    from jinja2 import Environment

    rendered = Environment().from_string(template).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert rendered == "<|user|>\nhi<|end|>\n<|assistant|>\n"
