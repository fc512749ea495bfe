"""Helpers for the parser tests: write calls the way each family's models write them, and collect what a
parser sends back."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mlx_backend.contract import ToolCallDelta
from mlx_backend.engine.tools import families
from mlx_backend.engine.tools.families import Family
from mlx_backend.engine.tools.stream import StreamOutput, ToolCallParser

TOOL_NAMES = ("get_weather", "add", "noop")
FAMILIES = (families.HERMES, families.LLAMA3_JSON, families.MISTRAL_JSON, families.MISTRAL_ARGS)
PYTHONIC = Family("mlx:pythonic", "<|tool_call_start|>", "<|tool_call_end|>", "delimited", mlx_parser="pythonic")


@dataclass
class Reply:
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # id, name, arguments (text)
    deltas: list[ToolCallDelta] = field(default_factory=list, compare=False)  # differ with the splits
    done: bool = False


def parser(family: Family, **options: Any) -> ToolCallParser:
    counter = iter(range(10_000))
    return ToolCallParser(family, options.pop("names", TOOL_NAMES), new_id=lambda: f"call_{next(counter)}",
                          **options)


def collect(outputs: Iterable[StreamOutput]) -> Reply:
    reply = Reply()
    for output in outputs:
        reply.content += output.content
        reply.deltas += output.tool_calls
        reply.done = output.done
        for delta in output.tool_calls:
            if delta.id is not None:
                reply.calls.append({"id": delta.id, "name": delta.name, "arguments": ""})
            reply.calls[delta.index]["arguments"] += delta.arguments
    return reply


def stream(make: Callable[[], ToolCallParser], pieces: Iterable[str]) -> Reply:
    p = make()
    return collect([*(p.feed(piece) for piece in pieces), p.finish()])


def split(text: str, cuts: Iterable[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def arguments_text(arguments: dict[str, Any], compact: bool, ascii_only: bool) -> str:
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(arguments, separators=separators, ensure_ascii=ascii_only)


def write(family: Family, calls: list[tuple[str, str]], before: str = "") -> str:
    """A reply as the family's models write it: `before` (content), then the calls (name, arguments text)."""
    if family is families.HERMES:
        blocks = [f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>' for n, a in calls]
        return before + ("\n" if before and calls else "") + "\n".join(blocks)
    if family is families.LLAMA3_JSON:
        assert len(calls) <= 1
        body = "".join(f'{{"name": "{n}", "parameters": {a}}}' for n, a in calls)
        return before + " <|python_tag|>" + body if before and calls else before + body
    if family is families.MISTRAL_JSON:
        body = ", ".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in calls)
        return before + (f"[TOOL_CALLS][{body}]" if calls else "")
    if family is families.MISTRAL_ARGS:
        return before + "".join(f"[TOOL_CALLS]{n}[ARGS]{a}" for n, a in calls)
    raise AssertionError(family)
