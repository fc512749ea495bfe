"""TEST ONLY (with --test-faults and --test-script FILE): scripted replies from the real engine.

A random test model never decides to call a tool, so a test cannot drive a real client (a coding agent
on its default settings, which it cannot make send our `user: "fault:..."`) through a tool round trip.
The script names what the engine should say instead: FILE holds a JSON list of rules

    [{"when": "run the marker command", "say": "<tool_call>{...}</tool_call><|im_end|>"}, ...]

and the first rule whose `when` occurs in the request's newest input (its messages after the last
assistant turn: the user's words, or a tool's result) makes the engine's sampling spell `say` with the
model's own tokenizer (mlx_backend/engine/faults.py, "emit:"), through the real detokenizer, reasoning splitter,
tool-call parser and wire. Sampling runs free after `say`, so a rule ends it with the family's end-of-turn
token (Qwen's `<|im_end|>`). A request no rule matches runs the model as usual. The file is read again for
every request, so a test can change the script while the server runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import msgspec

from mlx_backend.contract import ChatMessage, Generate

log = logging.getLogger("mlx_gateway")

EMIT_PREFIX = "emit:"  # mlx_backend/engine/faults.py: sampling held to the text's tokens


class Rule(msgspec.Struct, forbid_unknown_fields=True):
    when: str
    say: str


def newest_input(messages: tuple[ChatMessage, ...]) -> str:
    """The text of the messages after the last assistant turn."""
    tail: list[str] = []
    for message in reversed(messages):
        if message.role == "assistant":
            break
        tail.append(message.content)
    return "\n".join(reversed(tail))


def scripted(command: Generate, script: Path) -> Generate:
    """`command` with a "say:" fault if a rule of the script matches it; as it is otherwise."""
    if command.messages is None or command.fault is not None:
        return command
    try:
        rules = msgspec.json.decode(script.read_bytes(), type=list[Rule])
    except (OSError, msgspec.DecodeError) as exc:
        log.error("test script %s unreadable: %s", script, exc)
        return command
    text = newest_input(command.messages)
    for rule in rules:
        if rule.when in text:
            log.info("test script: rule %s matches; the engine says %s", json.dumps(rule.when),
                     json.dumps(rule.say[:200]))
            return msgspec.structs.replace(command, fault=EMIT_PREFIX + rule.say)
    return command
