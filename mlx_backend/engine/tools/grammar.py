"""Lark grammars (llguidance's syntax) that force well-formed tool calls, per family.

- tool_choice "required": at least one call of one of the tools, nothing else; a named function: that
  one tool. Each call's arguments must validate against its tool's `parameters` schema (vLLM's approach,
  written per family: the family's own markers around one `%json` schema per tool).
- parallel_tool_calls false (or a family whose template renders one call per turn): exactly one call.
- "auto" with a `strict: true` tool: free text, and once the model opens a call, the call grammar. The
  switch needs no state machine: every family's call opens with a special token (`<tool_call>`,
  `[TOOL_CALLS]`), which a text regex can never produce, so `TEXT? calls?` is unambiguous; Llama's bare
  JSON opens with "{", so its text is text that does not start with "{". Tools without `strict` get any
  JSON object as arguments there (the model chose to call; only the strict ones promised a schema).
- "auto" without strict tools, and "none": no grammar (None).

Markers that are single tokens are written as token ids (`<[id]>`): llguidance matches every added token
only by id, never by its text. The JSON is held to the layout chat templates render (", " and ": "), so a
forced call looks like the calls the model saw in its prompt, and whitespace cannot run on forever.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Mapping
from typing import Any

from mlx_backend.engine.tools.families import HARMONY, HERMES, LLAMA3_JSON, MISTRAL_ARGS, MISTRAL_JSON, Family
from mlx_backend.grammar import bounded, closed_objects

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A tool that declares no parameters takes none: "{}" (OpenAI's reading of an absent `parameters`).
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


# llguidance reads a repetition count as a 32-bit signed number; a bound no reply could reach is no bound.
MOST_REPEATS = 2**31 - 1


def tool_grammar(family: Family, tools: list[dict[str, Any]], forced: bool, limit: int, tokenizer: Any) -> str | None:
    """The grammar for calls of `tools` (their `function` definitions) in `family`'s format: `forced`, a call
    must come (else free text first, and a call that opens is held to it); at most `limit` calls (the grammar
    ends after them: a model cannot call forever). None for a family whose format cannot be forced."""
    limit = min(limit, MOST_REPEATS)
    one = limit == 1
    more = f"{{0,{limit - 1}}}"
    vocab = _vocabulary(tokenizer)

    def token(text: str) -> str:
        return f"<[{vocab[text]}]>" if text in vocab else json.dumps(text)

    def schema(tool: dict[str, Any], key: str, call_object: bool) -> str:
        arguments = _parameters(tool) if forced or tool.get("strict") is True else bounded({"type": "object"})
        return "%json " + json.dumps(_call_schema(tool["name"], key, arguments) if call_object else _root(arguments))

    rules = [f"tool{i}: {schema(t, family.argument_keys[0], family.body == 'json')}" for i, t in enumerate(tools)]
    any_tool = "tool: " + " | ".join(f"tool{i}" for i in range(len(tools)))

    if family.name == HERMES.name:
        call = f'call: {token(HERMES.start)} "\\n" tool "\\n" {token(HERMES.end)}'
        calls = "calls: call" if one else f'calls: call ("\\n" call){more}'
        start = "start: calls" if forced else "start: TEXT? calls?"
    elif family.name == MISTRAL_JSON.name:
        call = f'call: {token(MISTRAL_JSON.start)} "[" tool ' + ('"]"' if one else f'(", " tool){more} "]"')
        calls = "calls: call"
        start = "start: calls" if forced else "start: TEXT? calls?"
    elif family.name == MISTRAL_ARGS.name:
        arguments = token("[ARGS]")
        rules = [f"tool{i}: {json.dumps(t['name'])} {arguments} {schema(t, '', False)}" for i, t in enumerate(tools)]
        call = f"call: {token(MISTRAL_ARGS.start)} tool"
        calls = "calls: call" if one else f"calls: call{{1,{limit}}}"
        start = "start: calls" if forced else "start: TEXT? calls?"
    elif family.name == LLAMA3_JSON.name:
        # One call per turn: the template cannot render more. Text that opens with "{" is a call.
        call = "call: tool"
        calls = "calls: call"
        start = "start: calls" if forced else "start: PLAIN? | WS? calls"
    elif family.name == HARMONY.name:
        if not forced:
            return None  # "auto" with strict tools: harmony's calls are not held to their schemas
        # gpt-oss: an optional analysis message, then one commentary message to functions.NAME, ended by
        # <|call|> (an EOS). The analysis text cannot hold a special token, so it stops at <|end|>.
        rules = [f"tool{i}: {json.dumps(t['name'])} {token('<|channel|>')} \"commentary json\" "
                 f"{token('<|message|>')} {schema(t, '', False)}" for i, t in enumerate(tools)]
        analysis = (f"analysis: {token('<|channel|>')} \"analysis\" {token('<|message|>')} /(?s:.*)/ "
                    f"{token('<|end|>')} {token('<|start|>')} \"assistant\"")
        rules.append(analysis)
        call = 'call: " to=functions." tool'
        calls = "calls: call"
        start = "start: analysis? calls"
    else:
        return None  # mlx-lm's other formats: not forceable (ToolRequest refuses required/named for them)
    think = _thinking(tokenizer, token)
    if think:  # a reasoning model may think first (Qwen3 opens its reply with <think>), then call
        start = f"start: think? ({start.removeprefix('start: ')})"
        rules.append(think)
    lines = [start, calls, call, any_tool, *rules]
    lines += [terminal for name, terminal in _TERMINALS.items() if name in start]
    return "\n".join(lines) + "\n"


_TERMINALS = {
    "TEXT": "TEXT: /(?s:.+)/",  # any text; it can never hold a special token, so it stops at a marker
    "PLAIN": r"PLAIN: /\s*[^\s{](?s:.*)/",  # text that does not open with "{"
    "WS": r"WS: /\s+/",
}


def _thinking(tokenizer: Any, token: Any) -> str | None:
    """A rule for a reasoning block, when the model has single-token think markers (mlx-lm finds them)."""
    start, end = getattr(tokenizer, "think_start", None), getattr(tokenizer, "think_end", None)
    vocab = _vocabulary(tokenizer)
    if not (isinstance(start, str) and isinstance(end, str) and start in vocab and end in vocab):
        return None
    return f"think: {token(start)} /(?s:.*)/ {token(end)} /\\s{{0,8}}/"


_vocabularies: weakref.WeakKeyDictionary[Any, Mapping[str, int]] = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer: Any) -> Mapping[str, int]:
    """The tokenizer's vocabulary, read once per tokenizer: `get_vocab()` builds a new dict of every token
    each time (0.1-0.3 s for 128k tokens), which every forced tool call paid on the MLX thread."""
    with contextlib.suppress(KeyError, TypeError):  # TypeError: not weak-referenceable (a test double)
        return _vocabularies[tokenizer]
    vocab: Mapping[str, int] = tokenizer.get_vocab()
    with contextlib.suppress(TypeError):
        _vocabularies[tokenizer] = vocab
    return vocab


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    parameters = tool.get("parameters")
    schema = closed_objects(parameters) if isinstance(parameters, dict) and parameters else _EMPTY_PARAMETERS
    return bounded(schema)  # type: ignore[no-any-return]


def _call_schema(name: str, key: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """{"name": <the tool>, <key>: <its arguments>}, nothing else, in that order."""
    inner, definitions = _split_definitions(arguments)
    return {
        "x-guidance": JSON_STYLE,
        "type": "object",
        "properties": {"name": {"const": name}, key: inner},
        "required": ["name", key],
        "additionalProperties": False,
        **definitions,
    }


def _root(arguments: dict[str, Any]) -> dict[str, Any]:
    return {"x-guidance": JSON_STYLE, **arguments}


def _split_definitions(schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A schema's "$defs" must sit at the root its "#/$defs/..." references resolve against; nested in
    the call object they would not, so they move up to the call schema."""
    moved: dict[str, Any] = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    return {k: v for k, v in schema.items() if k not in moved}, moved
