"""One choice's tokens -> Deltas and its end: text through the detokenizer, tool-call markup parsed out
of the content, stop strings matched on the content only, token counts and logprobs on the Deltas."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mlx_backend.contract import Delta, TokenLogprob
from mlx_backend.engine.choice import ChoiceOutput
from mlx_backend.engine.reasoning import ThinkingBudget, ThinkSplitter
from mlx_backend.engine.stops import StopMatcher
from mlx_backend.engine.tools import ToolCallParser
from mlx_backend.engine.tools.families import HERMES


class Letters:
    """A detokenizer whose token i is the i-th character of a script: enough to drive ChoiceOutput."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.last_segment = ""

    def add_token(self, token: int) -> None:
        self.last_segment = self.script[token]

    def finalize(self) -> None:
        self.last_segment = ""


def run(script: str, output: ChoiceOutput, eos: bool = True) -> tuple[list[Delta], str | None]:
    deltas: list[Delta] = []
    ended = None
    for i in range(len(script)):
        last = i == len(script) - 1
        delta, ended = output.on_token(i, "length" if last and not eos else None, None)
        deltas += [delta] if delta else []
        if ended:
            return deltas, ended
    if eos:
        delta, ended = output.on_token(len(script), "stop", None)
        deltas += [delta] if delta else []
    return deltas, ended


def choice(script: str, stops: tuple[str, ...] = (), parser: ToolCallParser | None = None,
           logprob_of: Any = None) -> ChoiceOutput:
    return ChoiceOutput("r", 0, Letters(script + "\0"), StopMatcher(stops), parser, logprob_of)


def test_text_flows_as_deltas_and_every_token_is_counted_once() -> None:
    deltas, ended = run("hello", choice("hello"))
    assert "".join(d.text for d in deltas) == "hello" and ended == "stop"
    assert sum(d.tokens for d in deltas) == 6  # five letters and the EOS


def test_a_stop_string_ends_the_choice_and_is_never_sent() -> None:
    deltas, ended = run("say stop here", choice("say stop here", stops=("stop",)))
    assert "".join(d.text for d in deltas) == "say " and ended == "stop"


def test_tool_call_markup_becomes_calls_and_the_reply_ends_as_tool_calls() -> None:
    script = 'ok <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    parser = ToolCallParser(HERMES, ["f"])
    deltas, ended = run(script, choice(script, parser=parser))
    assert "".join(d.text for d in deltas) == "ok" and ended == "tool_calls"
    pieces = [p for d in deltas for p in d.tool_calls]
    assert pieces[0].name == "f" and pieces[0].id and "".join(p.arguments for p in pieces) == '{"a": 1}'


def test_a_stop_string_inside_a_calls_json_does_not_cut_it() -> None:
    script = '<tool_call>\n{"name": "f", "arguments": {"a": "stop"}}\n</tool_call>'
    deltas, ended = run(script, choice(script, stops=("stop",), parser=ToolCallParser(HERMES, ["f"])))
    assert ended == "tool_calls" and "".join(p.arguments for d in deltas for p in d.tool_calls) == '{"a": "stop"}'


def test_without_parallel_calls_the_choice_ends_with_its_first_complete_call() -> None:
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    script = call + "\n" + call
    deltas, ended = run(script, choice(script, parser=ToolCallParser(HERMES, ["f"], parallel=False)), eos=False)
    assert ended == "tool_calls" and {p.index for d in deltas for p in d.tool_calls} == {0}
    assert sum(d.tokens for d in deltas) < len(script)  # it ended before the second call was generated


def test_cut_by_length_a_choice_with_calls_still_reads_length() -> None:
    script = '<tool_call>\n{"name": "f", "arguments": {"a": 1'
    _, ended = run(script, choice(script, parser=ToolCallParser(HERMES, ["f"])), eos=False)
    assert ended == "length"


def test_logprobs_ride_on_the_delta_of_their_tokens_and_the_eos_has_none() -> None:
    entries = iter(range(100))

    def logprob_of(_: Any, token: int) -> TokenLogprob:
        return TokenLogprob(str(token), b"", -float(next(entries)))

    deltas, _ = run("abc", choice("abc", logprob_of=logprob_of))
    assert [e.token for d in deltas for e in d.logprobs] == ["0", "1", "2"]


# -- reasoning -------------------------------------------------------------------------------------------------


def test_reasoning_is_taken_out_before_the_tool_parser_and_the_stops_and_its_tokens_are_counted() -> None:
    script = "<think>a\nb</think>\n\nhi x<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>"
    output = ChoiceOutput("r", 0, Letters(script + "\0"), StopMatcher(("b",)), ToolCallParser(HERMES, ["f"]), None,
                          ThinkSplitter("<think>", "</think>", inside=False))
    deltas, ended = run(script, output)
    assert "".join(d.reasoning for d in deltas) == "a\nb"  # a stop string does not match inside the reasoning
    assert "".join(d.text for d in deltas) == "hi x"
    assert [c.name for d in deltas for c in d.tool_calls if c.name] == ["f"] and ended == "tool_calls"
    assert sum(d.tokens for d in deltas) == len(script) + 1
    # Counted from the token that completes the opening marker through the one that completes the closing one
    # (single tokens in a real vocabulary; here one character each).
    assert output.reasoning_tokens == len(">a\nb</think>")


def test_the_budget_is_spent_once_the_reasoning_has_used_it() -> None:
    budget = ThinkingBudget(3, [7, 8])
    output = ChoiceOutput("r", 0, Letters("abcdef\0"), StopMatcher(()), None, None,
                          ThinkSplitter("<think>", "</think>", inside=True), budget)
    output.on_token(0, None, None)
    output.on_token(1, None, None)
    assert not budget.spent
    output.on_token(2, None, None)
    assert budget.spent
    logits = mx.zeros((1, 10))
    forced = [int(mx.argmax(budget(mx.array([0]), logits)).item()) for _ in range(2)]
    assert forced == [7, 8]  # the end markup, token by token
    assert budget(mx.array([0]), logits) is logits  # then the model runs free
