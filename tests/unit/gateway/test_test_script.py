"""gateway/test_script.py: the test-only scripted replies (--test-script), matched on the newest input."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.test_script import newest_input, scripted
from mlx_backend.contract import ChatMessage, Generate, SamplingParams, ToolCall

TURN = (ChatMessage("system", "You help."), ChatMessage("user", "run the marker command"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "bash", "{}"),)),
        ChatMessage("tool", "agent-marker-42", tool_call_id="c1"), ChatMessage("user", "and then?"))


def command(messages: tuple[ChatMessage, ...], fault: str | None = None) -> Generate:
    return Generate("r1", "m", SamplingParams(16), messages=messages, fault=fault)


def test_the_newest_input_is_what_follows_the_last_assistant_turn() -> None:
    assert newest_input(TURN) == "agent-marker-42\nand then?"
    assert newest_input(TURN[:2]) == "You help.\nrun the marker command"


def test_the_first_matching_rule_becomes_an_emit_fault_and_no_match_leaves_the_request_alone(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"when": "marker command", "say": "<tool_call>x</tool_call>"},
                                  {"when": "marker-42", "say": "It printed 42."},
                                  {"when": "then", "say": "never: an earlier rule matched"}]))
    assert scripted(command(TURN[:2]), script).fault == "emit:<tool_call>x</tool_call>"
    assert scripted(command(TURN), script).fault == "emit:It printed 42."
    alone = command((ChatMessage("user", "hello"),))
    assert scripted(alone, script) is alone
    faulted = command(TURN, fault="abort")  # a request's own fault wins
    assert scripted(faulted, script) is faulted


def test_the_script_is_read_for_every_request_and_an_unreadable_one_scripts_nothing(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text("[]")
    assert scripted(command(TURN), script).fault is None
    script.write_text(json.dumps([{"when": "then", "say": "Now."}]))
    assert scripted(command(TURN), script).fault == "emit:Now."
    script.write_text("{not json")
    assert scripted(command(TURN), script).fault is None
