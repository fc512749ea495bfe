"""The reasoning splitter, per markup kind: a reply's text into reasoning and content, whatever the token
boundaries (every split of the text gives the same result as the text whole)."""

from __future__ import annotations

import json

import pytest

from mlx_backend.reasoning import HARMONY_CALL_END, HARMONY_CALL_START, HarmonySplitter, Split, ThinkSplitter


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
