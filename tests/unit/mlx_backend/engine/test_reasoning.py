"""The reasoning splitter, per markup kind: a reply's text into reasoning and content, whatever the token
boundaries (every split of the text gives the same result as the text whole)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer

from mlx_backend.contract import ChatMessage, Constraint, Generate, ReasoningControl, SamplingParams, ToolCall
from mlx_backend.engine.reasoning import (
    HARMONY_CALL_END,
    HARMONY_CALL_START,
    HarmonySplitter,
    Split,
    ThinkSplitter,
    detect_reasoning,
)
from mlx_backend.engine.tools import ToolRequest, encode_prompt
from tests.support import tiny_models
from tests.support.tool_specs import specs


def run(splitter: ThinkSplitter | HarmonySplitter, pieces: list[str]) -> tuple[str, str]:
    reasoning, content = "", ""
    for piece in pieces:
        out = splitter.feed(piece)
        reasoning, content = reasoning + out.reasoning, content + out.content
    out = splitter.finish()
    return reasoning + out.reasoning, content + out.content


def every_split(text: str) -> list[list[str]]:
    """The text whole, one character at a time, and cut in two at every position."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


THINK_CASES = [
    # (reply text, starts inside the block, reasoning, content)
    ("<think>\nLet me see.\nTwo lines.\n</think>\n\nThe answer is 4.", False, "Let me see.\nTwo lines.",
     "The answer is 4."),
    ("Let me see.\n</think>\n\nFour.", True, "Let me see.", "Four."),  # the prompt opened the block
    ("Just an answer, no thinking.", False, "", "Just an answer, no thinking."),
    ("<think>\n\n</think>\n\nEmpty thoughts.", False, "", "Empty thoughts."),
    ("<think>a < b and </thin is not the end</think>x", False, "a < b and </thin is not the end", "x"),
    ("<think>cut short by max_tokens", False, "cut short by max_tokens", ""),
    ("<think>one</think>\n\n<tool_call>{}</tool_call><think>two</think>done", False, "onetwo",
     "<tool_call>{}</tool_call>done"),
]


@pytest.mark.parametrize(("text", "inside", "reasoning", "content"), THINK_CASES)
def test_a_think_block_is_reasoning_and_its_markup_is_neither(text: str, inside: bool, reasoning: str,
                                                             content: str) -> None:
    for pieces in every_split(text):
        assert run(ThinkSplitter("<think>", "</think>", inside), pieces) == (reasoning, content), pieces


def test_a_tail_that_may_be_a_marker_is_held_until_decided() -> None:
    splitter = ThinkSplitter("<think>", "</think>", inside=True)
    assert splitter.feed("thinking </th") == Split("thinking ", "")
    assert splitter.feed("ink>answer") == Split("", "answer")
    assert not splitter.inside


def test_reasonings_trailing_newlines_wait_for_more_reasoning() -> None:
    splitter = ThinkSplitter("<think>", "</think>", inside=True)
    assert splitter.feed("a\n") == Split("a", "")
    assert splitter.feed("\nb") == Split("\n\nb", "")


def call(name: str, arguments: dict[str, object]) -> str:
    return HARMONY_CALL_START + json.dumps({"name": name, "arguments": arguments}) + HARMONY_CALL_END


HARMONY_CASES = [
    ("<|channel|>analysis<|message|>User says hi.<|end|><|start|>assistant<|channel|>final<|message|>Hello!",
     "User says hi.", "Hello!"),
    ("<|channel|>final<|message|>No analysis.", "", "No analysis."),
    ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}',
     "Need weather.", call("get_weather", {"city": "Paris"})),
    ('<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.add<|channel|>commentary json'
     '<|message|>{"a": 1}<|call|>', "x", call("add", {"a": 1})),
    ("<|channel|>commentary<|message|>Checking now.<|end|><|start|>assistant<|channel|>final<|message|>Done.",
     "", "Checking now.Done."),
    ("<|channel|>analysis<|message|>go<|end|><|start|>assistant to=browser.search<|channel|>commentary"
     '<|message|>{"q": 1}<|call|>', "go", ""),
    ("<|channel|>analysis<|message|>cut short", "cut short", ""),
]


@pytest.mark.parametrize(("text", "reasoning", "content"), HARMONY_CASES)
def test_harmony_analysis_is_reasoning_final_is_content_and_a_call_is_its_json(text: str, reasoning: str,
                                                                               content: str) -> None:
    for pieces in every_split(text):
        got_reasoning, got_content = run(HarmonySplitter(), pieces)
        assert got_reasoning == reasoning, pieces
        if content.startswith(HARMONY_CALL_START):
            body = got_content.removeprefix(HARMONY_CALL_START).removesuffix(HARMONY_CALL_END)
            assert json.loads(body) == json.loads(content.removeprefix(HARMONY_CALL_START)
                                                  .removesuffix(HARMONY_CALL_END)), pieces
        else:
            assert got_content == content, pieces


def test_harmony_knows_when_it_is_inside_the_analysis() -> None:
    splitter = HarmonySplitter()
    splitter.feed("<|channel|>analysis<|message|>thinking")
    assert splitter.inside
    splitter.feed("<|end|><|start|>assistant<|channel|>final<|message|>x")
    assert not splitter.inside


# -- the prompt: controls and history, through each family's real template --------------------------------

FAMILIES = ("qwen3", "qwen3-thinking-2507", "deepseek-r1", "gpt-oss", "glm-4.6", "qwen2.5")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reasoning_tokenizers")
    loaded = {}
    for family in FAMILIES:
        path = tiny_models.make_tiny_model(root / family, chat_format=family, context_length=4096)  # type: ignore[arg-type]
        config = json.loads((path / "config.json").read_text())
        loaded[family] = load_tokenizer(path, eos_token_ids=config["eos_token_id"])  # type: ignore[no-untyped-call]
    return loaded


def prompt(tokenizer: Any, control: ReasoningControl | None = None, messages: tuple[ChatMessage, ...] = (
        ChatMessage("user", "hi"),), **fields: Any) -> str:
    command = Generate("r", "m", SamplingParams(max_tokens=8), messages=messages, reasoning=control, **fields)
    return str(tokenizer.decode(encode_prompt(command, tokenizer, ToolRequest.from_command(command, tokenizer))))


def test_each_family_is_read_from_its_own_tokenizer_and_template(tokenizers: dict[str, Any]) -> None:
    kinds = {family: (f.kind, f.start, f.end) if (f := detect_reasoning(tok)) else None
             for family, tok in tokenizers.items()}
    assert kinds == {"qwen3": ("think", "<think>", "</think>"), "qwen3-thinking-2507": ("think", "<think>", "</think>"),
                     "deepseek-r1": ("think", "<think>", "</think>"), "gpt-oss": ("harmony", "", ""),
                     "glm-4.6": ("think", "<think>", "</think>"), "qwen2.5": None}


def test_enable_thinking_reaches_the_templates_that_read_it(tokenizers: dict[str, Any]) -> None:
    off = ReasoningControl(enabled=False)
    assert prompt(tokenizers["qwen3"], off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt(tokenizers["qwen3"]).endswith("<|im_start|>assistant\n")
    assert prompt(tokenizers["glm-4.6"], off).endswith("<|assistant|>\n<think></think>")
    assert prompt(tokenizers["glm-4.6"]).endswith("<|assistant|>")


def test_a_prompt_opened_reasoning_is_closed_when_thinking_is_off_or_a_grammar_holds_the_reply(
        tokenizers: dict[str, Any]) -> None:
    for family in ("qwen3-thinking-2507", "deepseek-r1"):
        tokenizer = tokenizers[family]
        assert prompt(tokenizer).endswith("<think>\n")
        assert prompt(tokenizer, ReasoningControl(enabled=False)).endswith("<think>\n</think>\n\n")
        assert prompt(tokenizer, constraint=Constraint("json_object")).endswith("<think>\n</think>\n\n")
        kwargs = json.dumps({"enable_thinking": False})  # the gateway turns this into enabled=False too
        assert prompt(tokenizer, ReasoningControl(enabled=False), template_kwargs=kwargs).endswith("</think>\n\n")


def test_gpt_oss_gets_the_effort_in_its_system_message(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["gpt-oss"]
    assert "Reasoning: medium" in prompt(tokenizer)  # the template's default
    assert "Reasoning: high" in prompt(tokenizer, ReasoningControl(enabled=True, effort="high"))
    assert "Reasoning: low" in prompt(tokenizer, ReasoningControl(enabled=False))  # it cannot stop thinking
    assert prompt(tokenizer, constraint=Constraint("json_object")).endswith("<|channel|>final<|message|>")


def test_chat_template_kwargs_reach_the_template_and_win(tokenizers: dict[str, Any]) -> None:
    kwargs = json.dumps({"reasoning_effort": "low", "model_identity": "You are a tiny test model."})
    text = prompt(tokenizers["gpt-oss"], ReasoningControl(enabled=True, effort="high"), template_kwargs=kwargs)
    assert "Reasoning: low" in text and "You are a tiny test model." in text


def test_a_model_that_cannot_think_ignores_the_controls(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["qwen2.5"]
    assert prompt(tokenizer, ReasoningControl(enabled=False, budget_tokens=4)) == prompt(tokenizer)


TOOL_TURN = (
    ChatMessage("user", "weather?"),
    ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),),
                reasoning="I should look it up."),
    ChatMessage("tool", "sunny", tool_call_id="call_1"),
)
TOOLS = specs([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                      "parameters": {"type": "object"}}}])


@pytest.mark.parametrize(("family", "shown"), [("qwen3", True), ("gpt-oss", True), ("glm-4.6", True)])
def test_earlier_reasoning_reaches_templates_that_render_it(tokenizers: dict[str, Any], family: str,
                                                            shown: bool) -> None:
    text = prompt(tokenizers[family], messages=TOOL_TURN, tools=TOOLS)
    assert ("I should look it up." in text) == shown


def test_reasoning_of_turns_before_the_last_question_is_dropped_by_qwen3(tokenizers: dict[str, Any]) -> None:
    history = (*TOOL_TURN, ChatMessage("assistant", "Sunny.", reasoning="Old thought."), ChatMessage("user", "ok"))
    text = prompt(tokenizers["qwen3"], messages=history, tools=TOOLS)
    assert "Old thought." not in text and "Sunny." in text
    r1 = prompt(tokenizers["deepseek-r1"], messages=(ChatMessage("user", "q"), ChatMessage(
        "assistant", "A.", reasoning="Old thought."), ChatMessage("user", "ok")))
    assert "Old thought." not in r1 and "A." in r1
