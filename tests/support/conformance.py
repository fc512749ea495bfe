"""Every body the server sends, checked against OpenAI's and Anthropic's own published schemas.

The references are vendored in tests/contract/references/ (their source, version and date are in each file's
`x-source`; the scripts beside them refresh them): OpenAI's OpenAPI document, cut to the schemas our routes
answer with, and JSON Schema made from Anthropic's TypeScript SDK (generated from Anthropic's OpenAPI spec).

`SCENARIOS` is the list of requests sent to a real server; each body that comes back (a JSON answer, an error,
every SSE event of a stream) is validated against the schema the reference names for it (`schema_for`). Add a
scenario for a new request field or event: its bodies are then held to the references like the rest.

Where a reference contradicts the API it describes, we follow the API: `EXCEPTIONS` is the one place such a
departure is allowed, each with its reason, applied as a patch to the loaded reference.

    python3 -m tests.support.conformance [--source DIR]   # counts of conforming bodies (DIR: code to serve)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema

REFERENCES = Path(__file__).resolve().parents[1] / "contract" / "references"
OPENAI_FILE = REFERENCES / "openai-openapi.subset.json"
ANTHROPIC_FILE = REFERENCES / "anthropic-messages.schema.json"

Json = dict[str, Any]


# -- the references, and where we knowingly depart from them ---------------------------------------------


@dataclass(frozen=True)
class Departure:
    reference: str  # "openai" or "anthropic"
    schema: str
    what: str
    reason: str
    patch: Callable[[Json], None]


def _allow_null_finish_reason(schemas: Json) -> None:
    finish = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]["finish_reason"]
    finish["enum"] = [*finish["enum"], None]
    finish["type"] = ["string", "null"]


def _ping_event(definitions: Json) -> None:
    definitions["PingEvent"] = {"type": "object", "properties": {"type": {"const": "ping"}},
                                "required": ["type"], "additionalProperties": False}


def _reasoning_content(schemas: Json) -> None:
    for name in ("ChatCompletionResponseMessage", "ChatCompletionStreamResponseDelta"):
        schemas[name]["properties"]["reasoning_content"] = {"type": "string"}


def _nullable_as_null(schemas: Json) -> None:
    def visit(node: Any) -> Any:
        if isinstance(node, list):
            return [visit(v) for v in node]
        if not isinstance(node, dict):
            return node
        node = {k: (visit(v) if k != "enum" else v) for k, v in node.items()}
        if node.pop("nullable", False):
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
            return {"anyOf": [node, {"type": "null"}]}
        return node

    schemas.update(visit(schemas))


def _base64_embedding(schemas: Json) -> None:
    embedding = schemas["Embedding"]["properties"]["embedding"]
    schemas["Embedding"]["properties"]["embedding"] = {"anyOf": [embedding, {"type": "string",
                                                                             "contentEncoding": "base64"}]}


EXCEPTIONS = [
    Departure(
        "openai", "(all)", "`nullable: true` allows null",
        "The document is OpenAPI 3.1 (JSON Schema 2020-12), where `nullable` means nothing, but its chat chunk "
        "schema still marks five fields nullable the OpenAPI 3.0 way (finish_reason, logprobs and its content and "
        "refusal, usage); the API sends null there (finish_reason on every chunk but the last), so the keyword is "
        "read as its authors meant it.",
        _nullable_as_null,
    ),
    Departure(
        "openai", "CreateCompletionResponse", "choices[].finish_reason may be null",
        "The legacy API's stream shares the completion object's schema, whose finish_reason enum has no null, "
        "yet OpenAI's server sends `finish_reason: null` on every chunk before the last of a choice (and its "
        "Python SDK types it Optional); the API wins.",
        _allow_null_finish_reason,
    ),
    Departure(
        "openai", "ChatCompletionResponseMessage, ChatCompletionStreamResponseDelta",
        "`reasoning_content` (a string) on a reply message and a streamed delta",
        "A reasoning model's thinking, apart from the answer: an extension OpenAI's chat API does not have (its "
        "reasoning stays hidden), sent by design under the name vLLM, llama.cpp, LM Studio and DeepSeek's API use, "
        "which clients of reasoning models read. Both schemas allow additional properties, so the body conforms "
        "without this entry; it is recorded here, and typed (a string, never null: absent when there is none), so "
        "the extension is held to what we document.",
        _reasoning_content,
    ),
    Departure(
        "openai", "Embedding", "`embedding` may be a base64 string",
        "With `encoding_format: \"base64\"` (which the OpenAI Python SDK asks for by default) the API sends each "
        "vector as base64 of its float32 values, and the SDK decodes it; the schema only describes the float list.",
        _base64_embedding,
    ),
    Departure(
        "anthropic", "PingEvent", "the `ping` stream event has a schema",
        "Anthropic's API sends `event: ping` (its streaming docs list it) but the SDK's RawMessageStreamEvent union "
        "has no type for it (the SDK skips it); we check it is exactly `{\"type\": \"ping\"}`.",
        _ping_event,
    ),
]


@cache
def _openai() -> Json:
    document: Json = json.loads(OPENAI_FILE.read_text())
    for departure in EXCEPTIONS:
        if departure.reference == "openai":
            departure.patch(document["components"]["schemas"])
    return document


@cache
def _anthropic() -> Json:
    document: Json = json.loads(ANTHROPIC_FILE.read_text())
    document.pop("$schema", None)  # draft-07 ignores keywords beside $ref; we validate with 2020-12 below
    for departure in EXCEPTIONS:
        if departure.reference == "anthropic":
            departure.patch(document["definitions"])
    return document


@cache
def validator(reference: str, name: str) -> jsonschema.Draft202012Validator:
    if reference == "openai":
        document, pointer = _openai(), f"#/components/schemas/{name}"
    else:
        document, pointer = _anthropic(), f"#/definitions/{name}"
    return jsonschema.Draft202012Validator({**document, "$ref": pointer})


@cache
def _responses_events() -> dict[str, str]:
    """Responses stream event type -> its schema in OpenAI's document."""
    schemas = _openai()["components"]["schemas"]
    found: dict[str, str] = {}
    for member in schemas["ResponseStreamEvent"]["anyOf"]:
        name = member["$ref"].rsplit("/", 1)[-1]
        kind = schemas[name]["properties"]["type"]
        for value in kind.get("enum", [kind.get("const")]):
            found[value] = name
    return found


_MESSAGES_EVENTS = {
    "message_start": "RawMessageStartEvent", "message_delta": "RawMessageDeltaEvent",
    "message_stop": "RawMessageStopEvent", "content_block_start": "RawContentBlockStartEvent",
    "content_block_delta": "RawContentBlockDeltaEvent", "content_block_stop": "RawContentBlockStopEvent",
    "ping": "PingEvent", "error": "ErrorResponse",
}


# -- bodies --------------------------------------------------------------------------------------------


@dataclass
class Body:
    scenario: str
    api: str  # chat, completions, responses, messages, count_tokens, models, model, embeddings
    data: Json
    status: int
    event: str | None = None  # the SSE event's name, or "data" for a chat/completions chunk


def schema_for(body: Body) -> tuple[str, str]:
    """(reference, schema name) that `body` must validate against."""
    anthropic = body.api in ("messages", "count_tokens")
    if body.status >= 400:
        return ("anthropic", "ErrorResponse") if anthropic else ("openai", "ErrorResponse")
    if body.event is not None:
        if body.api == "chat":
            return "openai", ("ErrorResponse" if "error" in body.data else "CreateChatCompletionStreamResponse")
        if body.api == "completions":
            return "openai", ("ErrorResponse" if "error" in body.data else "CreateCompletionResponse")
        if body.api == "responses":
            return "openai", _responses_events()[body.event]
        return "anthropic", _MESSAGES_EVENTS[body.event]
    return {
        "chat": ("openai", "CreateChatCompletionResponse"), "completions": ("openai", "CreateCompletionResponse"),
        "responses": ("openai", "Response"), "models": ("openai", "ListModelsResponse"),
        "model": ("openai", "Model"), "messages": ("anthropic", "Message"),
        "count_tokens": ("anthropic", "MessageTokensCount"), "embeddings": ("openai", "CreateEmbeddingResponse"),
    }[body.api]


def violations(body: Body) -> list[str]:
    """What in `body` breaks its schema (empty when it conforms); each as `path: message`."""
    reference, name = schema_for(body)
    found = []
    for error in validator(reference, name).iter_errors(body.data):
        best = jsonschema.exceptions.best_match([error])
        where = "/".join(str(p) for p in best.absolute_path) or "(body)"
        found.append(f"{reference}:{name} at {where}: {best.message[:300]}")
    return found


# -- scenarios -------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "Say something about the weather."}]
_CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
         "additionalProperties": False}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                "parameters": _CITY}}]
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
                    "parameters": _CITY}]
MESSAGES_TOOLS = [{"name": "get_weather", "description": "The weather in a city", "input_schema": _CITY}]
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12},
                                           "sure": {"type": "boolean"}},
          "required": ["answer", "sure"], "additionalProperties": False}
GREEDY = {"temperature": 0}
# A reasoning model's replies, spelled by the test-only fault `emit:` (the sampler may pick only these tokens) on a
# tiny model wearing Qwen3's template: the tokens still go through the real detokenizer, reasoning splitter,
# tool-call parser and API layers (as in tests/integration/test_reasoning.py).
THINKS = "fault:emit:<think>\nI weigh it.\n</think>\n\nFour.<|im_end|>"
THINKS_THEN_CALLS = ('fault:emit:<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
                     '"arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>')
NAMESPACE_TOOLS = [{"type": "namespace", "name": "weather_tools", "description": "Weather.",
                    "tools": RESPONSES_TOOLS}, {"type": "web_search"}]  # Codex's: a namespace and a hosted tool


@dataclass(frozen=True)
class Scenario:
    name: str
    api: str
    path: str
    body: Json | None = None  # None: a GET
    headers: dict[str, str] = field(default_factory=dict)


def _chat(name: str, **body: Any) -> Scenario:
    return Scenario(name, "chat", "/v1/chat/completions",
                    {"model": "tiny", "messages": USER, "max_tokens": 12, **GREEDY, **body})


def _completion(name: str, **body: Any) -> Scenario:
    return Scenario(name, "completions", "/v1/completions",
                    {"model": "tiny", "prompt": "The weather", "max_tokens": 12, **GREEDY, **body})


def _response(name: str, **body: Any) -> Scenario:
    return Scenario(name, "responses", "/v1/responses",
                    {"model": "tiny", "input": "Say something.", "max_output_tokens": 12, **GREEDY, **body})


def _message(name: str, **body: Any) -> Scenario:
    return Scenario(name, "messages", "/v1/messages",
                    {"model": "tiny", "messages": USER, "max_tokens": 12, **GREEDY, **body})


def _both(make: Callable[..., Scenario], name: str, **body: Any) -> list[Scenario]:
    """The scenario answered whole and streamed."""
    return [make(name, **body), make(f"{name}, streamed", stream=True, **body)]


USAGE = {"stream_options": {"include_usage": True}}
SCENARIOS: list[Scenario] = [
    # chat completions
    *_both(_chat, "chat"),
    _chat("chat, streamed with usage", stream=True, **USAGE),
    *_both(_chat, "chat, n=2", n=2, temperature=1, seed=7),
    _chat("chat, n=2, streamed with usage", stream=True, n=2, temperature=1, seed=7, **USAGE),
    *_both(_chat, "chat, logprobs", logprobs=True, top_logprobs=2),
    *_both(_chat, "chat, length", max_tokens=2),
    *_both(_chat, "chat, stop", stop=["the", "a"]),
    *_both(_chat, "chat, tool call", model="qwen", max_tokens=60, tools=CHAT_TOOLS, tool_choice="required"),
    *_both(_chat, "chat, named tool call", model="qwen", max_tokens=60, tools=CHAT_TOOLS,
           tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    *_both(_chat, "chat, json_schema", model="json", max_tokens=60,
           response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER,
                                                                   "strict": True}}),
    *_both(_chat, "chat, json_object", model="json", max_tokens=30, response_format={"type": "json_object"}),
    *_both(_chat, "chat, engine fault", user="fault:raise"),
    *_both(_chat, "chat, reasoning", model="qwen3", max_tokens=80, user=THINKS, reasoning_effort="high"),
    _chat("chat, reasoning, streamed with usage", model="qwen3", max_tokens=80, user=THINKS, stream=True, **USAGE),
    *_both(_chat, "chat, reasoning then a tool call", model="qwen3", max_tokens=120, user=THINKS_THEN_CALLS,
           tools=CHAT_TOOLS),
    _chat("chat, reasoning sent back", model="qwen3", max_tokens=80, user=THINKS,
          chat_template_kwargs={"enable_thinking": True},
          messages=[*USER, {"role": "assistant", "content": "Sunny.", "reasoning_content": "I looked."}, *USER]),
    _chat("chat, refused template variable", model="qwen3", chat_template_kwargs={"tools": []}),
    _chat("chat, unknown model", model="nope"),
    _chat("chat, invalid value", temperature=9),
    _chat("chat, wrong type", stream="true"),
    _chat("chat, unknown field", frobnicate=1),
    # legacy completions
    *_both(_completion, "completion"),
    _completion("completion, streamed with usage", stream=True, **USAGE),
    *_both(_completion, "completion, n=2", n=2, temperature=1, seed=7),
    *_both(_completion, "completion, logprobs", logprobs=2),
    *_both(_completion, "completion, echo", echo=True),
    *_both(_completion, "completion, engine fault", user="fault:raise"),
    _completion("completion, unknown model", model="nope"),
    # Responses
    *_both(_response, "response"),
    *_both(_response, "response, instructions", instructions="Be brief."),
    *_both(_response, "response, incomplete", max_output_tokens=2),
    *_both(_response, "response, tool call", model="qwen", max_output_tokens=60, tools=RESPONSES_TOOLS,
           tool_choice="required"),
    *_both(_response, "response, json_schema", model="json", max_output_tokens=60,
           text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}}),
    *_both(_response, "response, engine fault", user="fault:raise"),
    _response("response, conversation",
              input=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                     {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                      "arguments": "{\"city\": \"Paris\"}"},
                     {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
              model="qwen", tools=RESPONSES_TOOLS),
    *_both(_response, "response, reasoning", model="qwen3", max_output_tokens=80, user=THINKS,
           reasoning={"effort": "high", "summary": "auto"}),
    *_both(_response, "response, namespace call after reasoning", model="qwen3", max_output_tokens=120,
           user=THINKS_THEN_CALLS, tools=NAMESPACE_TOOLS, max_tool_calls=1,
           client_metadata={"session_id": "s-1"}),
    _response("response, reasoning sent back", model="qwen3", max_output_tokens=80, user=THINKS,
              input=[{"role": "user", "content": "Weather in Oslo?"},
                     {"type": "reasoning", "id": "rs_1", "summary": [],
                      "content": [{"type": "reasoning_text", "text": "I need the weather."}]},
                     {"type": "function_call", "call_id": "call_1", "name": "get_weather", "namespace": "weather_tools",
                      "arguments": "{\"city\": \"Oslo\"}"},
                     {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
              tools=NAMESPACE_TOOLS),
    _response("response, refused hosted tool choice", model="qwen3", tools=NAMESPACE_TOOLS,
              tool_choice={"type": "web_search"}),
    _response("response, unknown model", model="nope"),
    _response("response, invalid value", temperature=9),
    Scenario("response, not stored", "responses", "/v1/responses/resp_nope"),
    # Anthropic Messages
    *_both(_message, "message"),
    *_both(_message, "message, system", system="Be brief."),
    *_both(_message, "message, max_tokens", max_tokens=2),
    *_both(_message, "message, stop_sequences", stop_sequences=["the", "a"]),
    *_both(_message, "message, tool_use", model="qwen", max_tokens=60, tools=MESSAGES_TOOLS,
           tool_choice={"type": "any"}),
    *_both(_message, "message, named tool", model="qwen", max_tokens=60, tools=MESSAGES_TOOLS,
           tool_choice={"type": "tool", "name": "get_weather"}),
    *_both(_message, "message, structured output", model="json", max_tokens=60,
           output_config={"format": {"type": "json_schema", "schema": ANSWER}}),
    *_both(_message, "message, engine fault", metadata={"user_id": "fault:raise"}),
    _message("message, tool result",
             model="qwen", tools=MESSAGES_TOOLS,
             messages=[{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                          "input": {"city": "Paris"}}]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                     "content": "sunny"}]}]),
    *_both(_message, "message, thinking", model="qwen3", max_tokens=80, metadata={"user_id": THINKS},
           thinking={"type": "enabled", "budget_tokens": 64}),
    *_both(_message, "message, adaptive thinking then tool_use", model="qwen3", max_tokens=120, tools=MESSAGES_TOOLS,
           metadata={"user_id": THINKS_THEN_CALLS}, thinking={"type": "adaptive"}, output_config={"effort": "high"}),
    _message("message, thinking sent back", model="qwen3", max_tokens=80, tools=MESSAGES_TOOLS,
             metadata={"user_id": THINKS}, context_management={"edits": [{"type": "clear_thinking_20251015"}]},
             messages=[{"role": "user", "content": "Weather in Oslo?"},
                       {"role": "assistant", "content": [
                           {"type": "thinking", "thinking": "I need the weather.", "signature": "sig"},
                           {"type": "redacted_thinking", "data": "opaque"},
                           {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                     "content": "sunny"}]},
                       {"role": "system", "content": "Answer in one word."},
                       {"role": "user", "content": "So?"}]),
    _message("message, refused thinking display", model="qwen3", thinking={"type": "adaptive", "display": "omitted"}),
    _message("message, refused context edit", context_management={"edits": [{"type": "clear_tool_uses_20250919"}]}),
    _message("message, unknown model", model="nope"),
    _message("message, invalid value", temperature=9),
    _message("message, wrong type", max_tokens="12"),
    Scenario("count_tokens", "count_tokens", "/v1/messages/count_tokens", {"model": "tiny", "messages": USER}),
    Scenario("count_tokens, unknown model", "count_tokens", "/v1/messages/count_tokens",
             {"model": "nope", "messages": USER}),
    # models
    Scenario("models", "models", "/v1/models"),
    Scenario("model", "model", "/v1/models/tiny"),
    Scenario("model, unknown", "model", "/v1/models/nope"),
    # embeddings
    Scenario("embeddings", "embeddings", "/v1/embeddings", {"model": "bge", "input": ["The weather", "is fine"]}),
    Scenario("embeddings, base64", "embeddings", "/v1/embeddings",
             {"model": "bge", "input": "The weather", "encoding_format": "base64", "user": "u1"}),
    Scenario("embeddings, dimensions", "embeddings", "/v1/embeddings",
             {"model": "qwen3-embedding", "input": ["The weather"], "dimensions": 16}),
    Scenario("embeddings, no input", "embeddings", "/v1/embeddings", {"model": "bge", "input": []}),
]


def _sse(text: str) -> Iterator[tuple[str, Json]]:
    """(event name or "data", payload) of each SSE frame; `[DONE]` is not a body."""
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n") if line and not line.startswith(":"))
        if lines.get("data", "[DONE]") != "[DONE]":
            yield lines.get("event", "data"), json.loads(lines["data"])


def collect(base_url: str, scenario: Scenario) -> list[Body]:
    """Send one scenario; every body it answered with."""
    with httpx.Client(base_url=base_url, timeout=120) as client:
        if scenario.body is None:
            response = client.get(scenario.path, headers=scenario.headers)
        else:
            response = client.post(scenario.path, json=scenario.body, headers=scenario.headers)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return [Body(scenario.name, scenario.api, data, response.status_code, event)
                for event, data in _sse(response.text)]
    bodies = [Body(scenario.name, scenario.api, response.json(), response.status_code)]
    if scenario.api == "responses" and response.status_code == 200 and scenario.body is not None:
        stored = httpx.get(f"{base_url}/v1/responses/{response.json()['id']}", timeout=30)
        if stored.status_code == 200:  # the stored copy, as GET /v1/responses/{id} answers it
            bodies.append(Body(f"{scenario.name} (retrieved)", "responses", stored.json(), stored.status_code))
    return bodies


# -- a server to run them against (the test uses its own fixture) ---------------------------------------


def make_models(root: Path) -> Path:
    """'tiny' (plain), 'qwen' (Qwen2.5's template and tool calls), 'qwen3' (Qwen3's template: it thinks),
    'json' (a JSON-shaped BPE); embedding models 'bge' (BERT) and 'qwen3-embedding'."""
    from tests.support.tiny_embedding_models import make_tiny_bert, make_tiny_qwen3_embedding
    from tests.support.tiny_models import make_tiny_model

    make_tiny_model(root / "tiny", context_length=512)
    make_tiny_model(root / "qwen", chat_format="qwen2.5", context_length=4096)
    make_tiny_model(root / "qwen3", chat_format="qwen3", context_length=4096)
    make_tiny_model(root / "json", tokenizer="bpe", context_length=4096)
    make_tiny_bert(root / "bge")
    make_tiny_qwen3_embedding(root / "qwen3-embedding")
    return root


SERVER_ARGS = ("--test-faults",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="serve the gateway code of this checkout (default: this one)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    from tests.support.server import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        root = make_models(Path(tmp) / "models")
        env = {"PYTHONPATH": str(args.source.resolve())} if args.source else {}
        if args.source:
            os.chdir(args.source)  # `python -m` puts the working directory first on the path
        server = ServerProcess(["--models-dir", str(root), *SERVER_ARGS], Path(tmp) / "server.log", env).start()
        try:
            server.wait_ready()
            totals: Counter[str] = Counter()
            good: Counter[str] = Counter()
            problems: Counter[str] = Counter()
            for scenario in SCENARIOS:
                for body in collect(server.base_url, scenario):
                    _, name = schema_for(body)
                    totals[body.api] += 1
                    found = violations(body)
                    good[body.api] += not found
                    for problem in found:
                        problems[problem.split(": ", 1)[0] + ": " + problem.split(": ", 1)[1][:120]] += 1
                    if found and args.verbose:
                        print(f"{scenario.name} [{body.event or name}]: {found[0]}")
        finally:
            server.stop()
    for api in totals:
        print(f"{api:13} {good[api]:4} of {totals[api]:4} bodies conform")
    print(f"{'all':13} {sum(good.values()):4} of {sum(totals.values()):4} bodies conform")
    for problem, count in problems.most_common():
        print(f"{count:5}  {problem}")
    sys.exit(0 if sum(good.values()) == sum(totals.values()) else 1)


if __name__ == "__main__":
    main()

