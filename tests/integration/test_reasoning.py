"""Reasoning models against a real server and engine, through the real `openai` and `anthropic` clients:
tiny random models wearing the published chat templates of Qwen3, Qwen3-Thinking-2507, DeepSeek-R1-Distill,
gpt-oss (harmony) and GLM-4.6.

A random model never writes `<think>` on purpose, so most replies here are held to a family's real markup
by the test-only fault `emit:TEXT` (the sampler may pick only TEXT's tokens, special tokens included): the
tokens still go through the real detokenizer, reasoning splitter, tool-call parser, IPC and API layers.
Templates that open the reasoning in the prompt (Qwen3-Thinking-2507, DeepSeek-R1) need no forcing: the
random reply is reasoning from its first token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support import tiny_models as tm
from tests.support.event_order import check_anthropic_events, check_responses_events, named_events
from tests.support.server import ServerProcess

pytestmark = pytest.mark.slow

FAMILIES = ("qwen3", "qwen3-thinking-2507", "deepseek-r1", "gpt-oss", "glm-4.6")
OPENS_IN_PROMPT = ("qwen3-thinking-2507", "deepseek-r1")
# A reply of each family: reasoning "I weigh it.", then the answer "Four.", in its own markup, ended by its EOS.
REPLY = {
    "qwen3": "<think>\nI weigh it.\n</think>\n\nFour.<|im_end|>",
    "qwen3-thinking-2507": "I weigh it.\n</think>\n\nFour.<|im_end|>",
    "deepseek-r1": "I weigh it.\n</think>\n\nFour.<\uff5cend\u2581of\u2581sentence\uff5c>",
    "gpt-oss": "<|channel|>analysis<|message|>I weigh it.<|end|><|start|>assistant<|channel|>final<|message|>"
               "Four.<|return|>",
    "glm-4.6": "<think>I weigh it.</think>\nFour.<|user|>",
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# Reasoning, then a call, in the markup of the families that call tools.
CALL = {
    "qwen3": '<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
             '{"city": "Oslo"}}\n</tool_call><|im_end|>',
    "gpt-oss": "<|channel|>analysis<|message|>I need the weather.<|end|><|start|>assistant to=functions.get_weather"
               '<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>',
    "glm-4.6": "<think>I need the weather.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
               "<arg_value>Oslo</arg_value>\n</tool_call><|observation|>",
}
ASK = [{"role": "user", "content": "What is two and two?"}]


def emit(text: str) -> str:
    return "fault:emit:" + text


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reasoning-models")
    for family in FAMILIES:
        tm.make_tiny_model(folder / family, chat_format=family, context_length=4096)  # type: ignore[arg-type]
    tm.make_tiny_model(folder / "plain", chat_format="qwen2.5", context_length=4096)  # a model that cannot think
    return folder


@pytest.fixture(scope="module")
def server(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    process = ServerProcess(["--models-dir", str(root), "--test-faults"], log).start()
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server: ServerProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def reasoning_of(message: Any) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


# -- chat completions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_gives_reasoning_content_apart_from_the_answer(client: openai.OpenAI, family: str) -> None:
    reply = client.chat.completions.create(model=family, messages=ASK, max_tokens=80,  # type: ignore[arg-type]
                                           user=emit(REPLY[family]))
    message = reply.choices[0].message
    assert (reasoning_of(message), message.content) == ("I weigh it.", "Four."), message
    assert reply.choices[0].finish_reason == "stop"
    details = reply.usage.completion_tokens_details if reply.usage else None
    assert reply.usage and details and 0 < (details.reasoning_tokens or 0) < reply.usage.completion_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_streams_reasoning_content_deltas_before_the_content(client: openai.OpenAI, family: str) -> None:
    chunks = list(client.chat.completions.create(model=family, messages=ASK, max_tokens=80, stream=True,  # type: ignore[arg-type]
                                                 user=emit(REPLY[family])))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == ("I weigh it.", "Four.")
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not (d.model_extra or {}).get("reasoning_content") for d in deltas[first_content:])
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("family", CALL)
@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_after_reasoning_is_a_tool_call(client: openai.OpenAI, family: str, stream: bool) -> None:
    common: dict[str, Any] = {"model": family, "messages": ASK, "tools": [WEATHER], "max_tokens": 120,
                              "user": emit(CALL[family])}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **common))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        pieces = [p for d in deltas for p in d.tool_calls or ()]
        name = pieces[0].function.name if pieces[0].function else None
        arguments = "".join(p.function.arguments or "" for p in pieces if p.function)
        content = "".join(d.content or "" for d in deltas)
        finish = chunks[-1].choices[0].finish_reason
    else:
        reply = client.chat.completions.create(**common)
        message = reply.choices[0].message
        reasoning, content = reasoning_of(message) or "", message.content or ""
        (call,) = message.tool_calls or ()
        name, arguments, finish = call.function.name, call.function.arguments, reply.choices[0].finish_reason  # type: ignore[union-attr]
    assert reasoning == "I need the weather." and content == ""
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Oslo"}, "tool_calls")


@pytest.mark.parametrize("family", CALL)
def test_a_tool_round_trip_with_the_reasoning_sent_back(client: openai.OpenAI, family: str) -> None:
    first = client.chat.completions.create(model=family, messages=ASK, tools=[WEATHER], max_tokens=120,  # type: ignore[arg-type,list-item]
                                           user=emit(CALL[family])).choices[0].message
    (call,) = first.tool_calls or ()
    history = [*ASK, {"role": "assistant", "content": None, "reasoning_content": reasoning_of(first),
                      "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    answer = REPLY[family].replace("I weigh it.", "It is sunny.").replace("Four.", "Sunny.")
    second = client.chat.completions.create(model=family, messages=history, tools=[WEATHER], max_tokens=80,  # type: ignore[arg-type,list-item]
                                            user=emit(answer))
    message = second.choices[0].message
    assert (reasoning_of(message), message.content) == ("It is sunny.", "Sunny.")


def test_a_prompt_that_opens_the_reasoning_makes_the_whole_reply_reasoning(client: openai.OpenAI, root: Path) -> None:
    for family in OPENS_IN_PROMPT:
        reply = client.chat.completions.create(model=family, messages=ASK, max_tokens=12,  # type: ignore[arg-type]
                                               logit_bias=no_end(root, family))
        message = reply.choices[0].message
        assert reasoning_of(message) and not message.content, (family, message)
        assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("family", "control"), [
    ("deepseek-r1", {"reasoning_effort": "none"}),
    ("qwen3-thinking-2507", {"chat_template_kwargs": {"enable_thinking": False}}),
])
def test_thinking_turned_off_closes_a_reasoning_the_prompt_opened(client: openai.OpenAI, root: Path, family: str,
                                                                  control: dict[str, Any]) -> None:
    on = client.chat.completions.create(model=family, messages=ASK, max_tokens=12, logit_bias=no_end(root, family))  # type: ignore[arg-type]
    off = client.chat.completions.create(model=family, messages=ASK, max_tokens=12, logit_bias=no_end(root, family),  # type: ignore[arg-type]
                                         extra_body=control)
    assert reasoning_of(on.choices[0].message) and not on.choices[0].message.content
    assert reasoning_of(off.choices[0].message) is None and off.choices[0].message.content
    assert off.usage and on.usage and off.usage.prompt_tokens > on.usage.prompt_tokens  # the closing marker


def test_qwen3s_enable_thinking_reaches_its_template(client: openai.OpenAI) -> None:
    on = client.chat.completions.create(model="qwen3", messages=ASK, max_tokens=1)  # type: ignore[arg-type]
    off = client.chat.completions.create(model="qwen3", messages=ASK, max_tokens=1,  # type: ignore[arg-type]
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    low = client.chat.completions.create(model="qwen3", messages=ASK, max_tokens=1, reasoning_effort="none")  # type: ignore[arg-type]
    assert on.usage and off.usage and low.usage
    assert off.usage.prompt_tokens == low.usage.prompt_tokens > on.usage.prompt_tokens  # <think></think> added


def test_a_model_that_cannot_think_answers_without_thinking(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="plain", messages=ASK, max_tokens=4, reasoning_effort="high")  # type: ignore[arg-type]
    assert reply.choices[0].message.content is not None and reasoning_of(reply.choices[0].message) is None


def no_end(root: Path, family: str) -> dict[str, int]:
    """logit_bias banning the family's end-of-reply tokens and its think markers: a random model then runs to
    max_tokens, and never opens or closes a reasoning block of its own accord."""
    ends = {"qwen3-thinking-2507": ("<|im_end|>", "<|endoftext|>", "<think>", "</think>"),
            "deepseek-r1": ("<\uff5cend\u2581of\u2581sentence\uff5c>", "<think>", "</think>")}[family]
    vocab = json.loads((root / family / "tokenizer.json").read_text())["added_tokens"]
    return {str(t["id"]): -100 for t in vocab if t["content"] in ends}


# -- Responses API -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "gpt-oss"])
def test_responses_gives_a_reasoning_item_before_the_message(client: openai.OpenAI, family: str) -> None:
    response = client.responses.create(model=family, input="What is two and two?", max_output_tokens=80,
                                       reasoning={"effort": "high", "summary": "auto"}, user=emit(REPLY[family]))
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert [c.text for c in reasoning.content or ()] == ["I weigh it."] and reasoning.summary == []
    assert response.output_text == "Four."
    assert response.usage and 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens
    assert response.reasoning and response.reasoning.effort == "high"


@pytest.mark.parametrize("family", ["qwen3", "gpt-oss"])
def test_responses_streams_reasoning_text_events(server: ServerProcess, family: str) -> None:
    raw = httpx.post(server.base_url + "/v1/responses", timeout=120, json={
        "model": family, "input": "What is two and two?", "max_output_tokens": 80, "stream": True,
        "reasoning": {"summary": "auto"}, "user": emit(REPLY[family])})
    final = check_responses_events(named_events(raw.text))
    assert [o["type"] for o in final["output"]] == ["reasoning", "message"]
    deltas = "".join(d["delta"] for n, d in named_events(raw.text) if n == "response.reasoning_text.delta")
    assert deltas == "I weigh it." == final["output"][0]["content"][0]["text"]


def test_responses_takes_its_reasoning_items_back_with_the_calls(client: openai.OpenAI) -> None:
    first = client.responses.create(model="gpt-oss", input="Weather in Oslo?", max_output_tokens=120,
                                    tools=[{"type": "function", **WEATHER["function"]}],  # type: ignore[list-item]
                                    user=emit(CALL["gpt-oss"]))
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and call.type == "function_call" and call.name == "get_weather"
    items = [{"role": "user", "content": "Weather in Oslo?"}, *[o.model_dump(exclude_none=True) for o in first.output],
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    second = client.responses.create(model="gpt-oss", input=items, max_output_tokens=80,  # type: ignore[arg-type]
                                     tools=[{"type": "function", **WEATHER["function"]}],  # type: ignore[list-item]
                                     user=emit(REPLY["gpt-oss"]))
    assert second.output_text == "Four."


# -- Messages API ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "glm-4.6", "deepseek-r1", "gpt-oss"])
def test_messages_gives_a_signed_thinking_block_before_the_text(claude: anthropic.Anthropic, family: str) -> None:
    message = claude.messages.create(model=family, max_tokens=80, messages=ASK,  # type: ignore[arg-type]
                                     thinking={"type": "adaptive"}, metadata={"user_id": emit(REPLY[family])},
                                     extra_body={"output_config": {"effort": "high"}})
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking == "I weigh it." and thinking.signature
    assert text.type == "text" and text.text == "Four." and message.stop_reason == "end_turn"


def test_messages_streams_thinking_and_signature_deltas(server: ServerProcess) -> None:
    raw = httpx.post(server.base_url + "/v1/messages", timeout=120, headers={"anthropic-version": "2023-06-01"},
                     json={"model": "qwen3", "max_tokens": 80, "stream": True, "messages": ASK,
                           "thinking": {"type": "enabled", "budget_tokens": 64},
                           "metadata": {"user_id": emit(REPLY["qwen3"])}})
    message = check_anthropic_events(named_events(raw.text))
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]
    assert message["content"][0]["thinking"] == "I weigh it." and message["content"][0]["signature"]


def test_messages_stream_through_the_sdk_and_a_tool_round_trip_with_thinking(claude: anthropic.Anthropic) -> None:
    tool = {"name": "get_weather", "description": "The weather in a city",
            "input_schema": WEATHER["function"]["parameters"]}  # type: ignore[index]
    with claude.messages.stream(model="qwen3", max_tokens=120, messages=ASK, tools=[tool],  # type: ignore[arg-type,list-item]
                                thinking={"type": "enabled", "budget_tokens": 100},
                                metadata={"user_id": emit(CALL["qwen3"])}) as stream:
        first = stream.get_final_message()
    thinking, use = first.content
    assert thinking.type == "thinking" and use.type == "tool_use" and use.input == {"city": "Oslo"}
    assert first.stop_reason == "tool_use"
    history = [*ASK, {"role": "assistant", "content": first.content},  # as the SDK's docs send a turn back
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    second = claude.messages.create(model="qwen3", max_tokens=80, messages=history, tools=[tool],  # type: ignore[arg-type,list-item]
                                    metadata={"user_id": emit(REPLY["qwen3"])})
    assert [b.type for b in second.content] == ["thinking", "text"]


def test_a_thinking_budget_closes_the_reasoning_and_the_answer_follows(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="qwen3-thinking-2507", max_tokens=40, messages=ASK,  # type: ignore[arg-type]
                                     extra_body={"temperature": 0}, thinking={"type": "enabled", "budget_tokens": 8})
    kinds = [b.type for b in message.content]
    assert kinds[0] == "thinking" and "text" in kinds, message.content
    # The model writes freely (random weights): only the budget ends its thinking, after about 8 tokens.
    assert message.content[0].thinking and len(message.content[0].thinking) < 8 * 8  # type: ignore[union-attr]


def test_thinking_disabled_on_a_model_that_always_thinks_gives_only_text(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="deepseek-r1", max_tokens=10, messages=ASK,  # type: ignore[arg-type]
                                     thinking={"type": "disabled"}, extra_body={"temperature": 0})
    assert all(b.type == "text" for b in message.content)


# -- forced calls on gpt-oss (harmony's own call markup, held to the tool's schema) ------------------------

BOUNDED_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_a_forced_call_on_gpt_oss_is_harmonys_markup_held_to_the_schema(client: openai.OpenAI, root: Path) -> None:
    channel = next(t["id"] for t in json.loads((root / "gpt-oss" / "tokenizer.json").read_text())["added_tokens"]
                   if t["content"] == "<|channel|>")
    # logit_bias against <|channel|> makes the random model skip the (unbounded) analysis; where the grammar
    # allows only <|channel|> (the call's header), it is still the token chosen.
    reply = client.chat.completions.create(
        model="gpt-oss", messages=ASK, tools=[BOUNDED_WEATHER], tool_choice="required", max_tokens=200,  # type: ignore[arg-type,list-item]
        temperature=0, logit_bias={str(channel): -100})
    (call,) = reply.choices[0].message.tool_calls or ()
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert call.function.name == "get_weather" and set(arguments) == {"city", "unit"}  # type: ignore[union-attr]
    assert reply.choices[0].finish_reason == "tool_calls"


def test_a_forced_call_on_gpt_oss_after_a_budgeted_analysis(claude: anthropic.Anthropic) -> None:
    tool = {"name": "get_weather", "description": "The weather in a city",
            "input_schema": BOUNDED_WEATHER["function"]["parameters"]}  # type: ignore[index]
    message = claude.messages.create(
        model="gpt-oss", max_tokens=200, messages=ASK, tools=[tool],  # type: ignore[arg-type,list-item]
        tool_choice={"type": "tool", "name": "get_weather"}, thinking={"type": "enabled", "budget_tokens": 6},
        extra_body={"temperature": 0})
    use = message.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and set(use.input) == {"city", "unit"}
    assert message.stop_reason == "tool_use"
    assert all(b.type == "thinking" for b in message.content[:-1])


def test_responses_stream_through_the_sdk_builds_the_reasoning_item(client: openai.OpenAI) -> None:
    with client.responses.stream(model="gpt-oss", input="What is two and two?", max_output_tokens=80,
                                 reasoning={"effort": "low"}, user=emit(REPLY["gpt-oss"])) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    reasoning, message = final.output
    assert message.type == "message"
    assert reasoning.type == "reasoning" and [c.text for c in reasoning.content or ()] == ["I weigh it."]
    assert final.output_text == "Four."


def test_a_forced_call_on_a_template_that_opens_the_reasoning_is_a_call(client: openai.OpenAI) -> None:
    # Qwen3-Thinking-2507's prompt opens <think>: a forced call's grammar expects the reply outside it, so the
    # block is closed in the prompt and the call comes at once.
    reply = client.chat.completions.create(
        model="qwen3-thinking-2507", messages=ASK, tools=[BOUNDED_WEATHER], max_tokens=200, temperature=0,  # type: ignore[arg-type,list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
    (call,) = reply.choices[0].message.tool_calls or ()
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city", "unit"}  # type: ignore[union-attr]
    assert reply.choices[0].finish_reason == "tool_calls" and reasoning_of(reply.choices[0].message) is None
