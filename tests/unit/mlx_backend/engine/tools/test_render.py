"""Prompts with tools, earlier calls and their results, rendered through each family's real template."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from mlx_backend.contract import ChatMessage, Generate, SamplingParams, ToolCall
from mlx_backend.engine.tools import ToolRequest, encode_prompt
from mlx_backend.errors import EngineError
from tests.support.tool_specs import specs

CALL_ID = "call_Ab3dEf6hIj9kLm2nOp5qRs8t"
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "noop", "description": "Does nothing"}},
]
CONVERSATION = (
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", tool_calls=(ToolCall(CALL_ID, "get_weather", '{"city": "Paris"}'),)),
    ChatMessage("tool", "sunny, 21 C", tool_call_id=CALL_ID),
)


def command(messages: tuple[ChatMessage, ...] = CONVERSATION, **options: Any) -> Generate:
    return Generate("r1", "tiny-model", SamplingParams(16), messages=messages, tools=specs(TOOLS), **options)


def render(tokenizer: Any, cmd: Generate) -> str:
    tokens = encode_prompt(cmd, tokenizer, ToolRequest.from_command(cmd, tokenizer))
    return str(tokenizer.decode(tokens))


@pytest.mark.parametrize("fmt", ["qwen2.5", "qwen3"])
def test_qwen_shows_the_tools_the_call_and_its_result(tokenizers: dict[str, Any], fmt: str) -> None:
    prompt = render(tokenizers[fmt], command())
    assert "<tools>\n" + json.dumps(TOOLS[0]) in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in prompt
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_llama_shows_the_tools_the_call_and_its_result_in_the_ipython_role(tokenizers: dict[str, Any]) -> None:
    prompt = render(tokenizers["llama3.1"], command())
    assert "Environment: ipython" in prompt and json.dumps(TOOLS[0], indent=4) in prompt
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}' \
           "<|eot_id|>" in prompt
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"sunny, 21 C"<|eot_id|>' in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_mistral_shows_the_tools_and_matches_call_and_result_with_nine_character_ids(
        tokenizers: dict[str, Any]) -> None:
    prompt = render(tokenizers["mistral"], command())
    assert prompt.startswith("<s>[AVAILABLE_TOOLS][") and '"name": "get_weather"' in prompt
    call = re.search(
        r'\[TOOL_CALLS\]\[\{"name": "get_weather", "arguments": \{"city": "Paris"\}, "id": "(\w+)"\}\]</s>', prompt)
    result = re.search(r'\[TOOL_RESULTS\]\{"content": sunny, 21 C, "call_id": "(\w+)"\}\[/TOOL_RESULTS\]', prompt)
    assert call and result
    assert call.group(1) == result.group(1) and len(call.group(1)) == 9 and call.group(1).isalnum()
    assert render(tokenizers["mistral"], command()) == prompt  # the same id every turn: the cached prefix holds


@pytest.mark.parametrize("fmt", ["qwen2.5", "qwen3", "llama3.1", "mistral"])
def test_markers_are_single_special_tokens_in_the_prompt(tokenizers: dict[str, Any], fmt: str) -> None:
    tokenizer = tokenizers[fmt]
    marker = {"llama3.1": "<|eot_id|>", "mistral": "[TOOL_CALLS]"}.get(fmt, "<tool_call>")
    cmd = command()
    tokens = encode_prompt(cmd, tokenizer, ToolRequest.from_command(cmd, tokenizer))
    assert tokenizer.convert_tokens_to_ids(marker) in tokens


@pytest.mark.parametrize("fmt", ["qwen2.5", "qwen3", "llama3.1", "mistral"])
def test_tool_choice_none_hides_the_tools_but_keeps_the_history(tokenizers: dict[str, Any], fmt: str) -> None:
    prompt = render(tokenizers[fmt], command(tool_choice="none"))
    assert "Current weather in a city" not in prompt
    assert "Paris" in prompt and "sunny, 21 C" in prompt


def test_a_template_s_own_refusal_is_reported_with_its_message(tokenizers: dict[str, Any]) -> None:
    calls = (ToolCall("call_1", "noop", "{}"), ToolCall("call_2", "noop", ""))
    two_calls = ChatMessage("assistant", "", tool_calls=calls)
    cmd = command((CONVERSATION[1], two_calls))
    with pytest.raises(EngineError) as raised:
        render(tokenizers["llama3.1"], cmd)
    assert raised.value.code == "invalid_request" and raised.value.param == "messages"
    assert "This model only supports single tool-calls at once!" in raised.value.message


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_arguments_that_are_not_a_json_object_are_refused_by_name(tokenizers: dict[str, Any], arguments: str) -> None:
    bad = ChatMessage("assistant", "", tool_calls=(ToolCall(CALL_ID, "get_weather", arguments),))
    with pytest.raises(EngineError) as raised:
        render(tokenizers["qwen2.5"], command((CONVERSATION[1], bad)))
    assert raised.value.param == "messages[1].tool_calls[0].function.arguments"


@pytest.mark.parametrize("fmt", ["qwen2.5", "qwen3", "llama3.1", "mistral"])
def test_without_tools_the_prompt_is_the_plain_chat_template_or_the_text(tokenizers: dict[str, Any],
                                                                         fmt: str) -> None:
    tokenizer = tokenizers[fmt]
    chat = Generate("r", "m", SamplingParams(8), messages=(ChatMessage("user", "Hello"),))
    text = Generate("r", "m", SamplingParams(8), prompt="Once upon a time")
    assert ToolRequest.from_command(chat, tokenizer) is None and ToolRequest.from_command(text, tokenizer) is None
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert encode_prompt(chat, tokenizer, None) == list(expected)
    assert encode_prompt(text, tokenizer, None) == list(tokenizer.encode("Once upon a time"))


def test_without_a_template_messages_become_a_plain_transcript_as_before(model_dirs: dict[str, Any],
                                                                          tmp_path: Any) -> None:
    from tests.support import tiny_models
    from tests.unit.mlx_backend.engine.tools.conftest import load

    tokenizer = load(tiny_models.remove_chat_template(tiny_models.copy_model(model_dirs["qwen2.5"], tmp_path / "m")))
    cmd = Generate("r", "m", SamplingParams(8), messages=(ChatMessage("user", "Hello"),))
    assert encode_prompt(cmd, tokenizer, None) == list(tokenizer.encode("user: Hello\nassistant:"))


MID_SYSTEM = (
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("system", "Answer in French."),
    ChatMessage("user", "Go on."),
)


def test_a_system_message_mid_conversation_stays_in_place_where_the_template_takes_it(
    tokenizers: dict[str, Any]
) -> None:
    prompt = render(tokenizers["qwen2.5"], command(MID_SYSTEM))
    assert ("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>system\nAnswer in French.<|im_end|>\n"
            "<|im_start|>user\nGo on.<|im_end|>") in prompt


def test_a_template_that_takes_one_system_turn_gets_every_system_message_merged_into_it(
    tokenizers: dict[str, Any]
) -> None:
    prompt = render(tokenizers["mistral"], command(MID_SYSTEM))
    assert "You are terse.\n\nAnswer in French." in prompt
    assert prompt.index("Weather in Paris?") < prompt.index("Go on.")
