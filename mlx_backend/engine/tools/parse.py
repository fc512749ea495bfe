"""Whole-text parsing: a finished reply's text -> (content, tool calls).

It is the stream parser fed the whole text at once, so a reply parsed whole and the same reply streamed
in any pieces give the same result by construction (tests/unit/mlx_backend/engine/tools/test_stream.py checks
every split).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_backend.engine.tools.stream import ParsedCall, ToolCallParser


@dataclass(frozen=True)
class ParsedReply:
    content: str
    calls: tuple[ParsedCall, ...]
    dropped: int  # markup that could not be read as a call of one of the tools


def parse_reply(parser: ToolCallParser, text: str) -> ParsedReply:
    """Parse a whole reply with a fresh parser (ToolRequest.parser(), or ToolCallParser(...))."""
    content = parser.feed(text).content + parser.finish().content
    return ParsedReply(content, tuple(parser.calls), parser.dropped)
