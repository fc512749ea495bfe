"""A reply as an ordered list of blocks (reasoning, text, or a tool call), built from the engine's deltas.

The Responses API and the Messages API both present a reply as items or content blocks, each opened,
filled and closed in turn (chat completions sends the deltas as they come: gateway/chat/render.py).
`Reply.add` takes each engine Delta and says what happened as `Opened`, `Grew` and `Closed` steps, which a
protocol renders as its own events; the finished `blocks` are the non-streaming body. Reasoning, text and
each call are blocks of their own: text that follows a call opens a new text block. Only the last block is
open; a late piece of a call already closed is kept in the body but cannot be streamed (it is logged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from mlx_backend.contract import Delta, ToolCallDelta

log = logging.getLogger("mlx_gateway")


@dataclass
class TextBlock:
    text: str = ""


@dataclass
class ReasoningBlock:
    """A reasoning model's thinking (the engine's Delta.reasoning), before the text or calls it leads to."""

    text: str = ""


@dataclass
class CallBlock:
    id: str
    name: str
    arguments: str = ""  # JSON text, as the model wrote it (a prefix of it if the reply was cut short)


Block = TextBlock | CallBlock | ReasoningBlock


@dataclass(frozen=True)
class Opened:
    position: int  # the block's index in the reply
    block: Block


@dataclass(frozen=True)
class Grew:
    position: int
    block: Block
    text: str  # the new text or argument characters


@dataclass(frozen=True)
class Closed:
    position: int
    block: Block


Step = Opened | Grew | Closed


@dataclass
class Reply:
    blocks: list[Block] = field(default_factory=list)
    _open: bool = False
    _calls: dict[int, int] = field(default_factory=dict)  # the engine's call index -> block position

    @property
    def calls(self) -> list[CallBlock]:
        return [b for b in self.blocks if isinstance(b, CallBlock)]

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.blocks if isinstance(b, TextBlock))

    @property
    def reasoning(self) -> str:
        return "".join(b.text for b in self.blocks if isinstance(b, ReasoningBlock))

    def add(self, delta: Delta) -> list[Step]:
        steps: list[Step] = []
        if delta.reasoning:  # a Delta's reasoning comes before its text
            if not (self._open and isinstance(self.blocks[-1], ReasoningBlock)):
                self._open_block(ReasoningBlock(), steps)
            self._grow(len(self.blocks) - 1, delta.reasoning, steps)
        if delta.text:
            if not (self._open and isinstance(self.blocks[-1], TextBlock)):
                self._open_block(TextBlock(), steps)
            self._grow(len(self.blocks) - 1, delta.text, steps)
        steps += self.add_calls(delta.tool_calls)
        return steps

    def add_calls(self, pieces: Iterable[ToolCallDelta]) -> list[Step]:
        """Tool-call pieces: a piece with an id and a name opens a call, the others grow theirs (the one
        place the gateway joins a call's pieces, for every API)."""
        steps: list[Step] = []
        for piece in pieces:
            if piece.id is not None and piece.name is not None:
                self._open_block(CallBlock(piece.id, piece.name), steps)
                self._calls[piece.index] = len(self.blocks) - 1
            position = self._calls.get(piece.index)
            if position is None:
                log.warning("tool-call piece for call %d, which never started; dropped", piece.index)
            elif piece.arguments:
                self._grow(position, piece.arguments, steps)
        return steps

    def finish(self) -> list[Step]:
        """Close the open block, if any (at the end of the reply)."""
        steps: list[Step] = []
        self._close(steps)
        return steps

    def _open_block(self, block: Block, steps: list[Step]) -> None:
        self._close(steps)
        self.blocks.append(block)
        self._open = True
        steps.append(Opened(len(self.blocks) - 1, block))

    def _close(self, steps: list[Step]) -> None:
        if self._open:
            self._open = False
            steps.append(Closed(len(self.blocks) - 1, self.blocks[-1]))

    def _grow(self, position: int, text: str, steps: list[Step]) -> None:
        block = self.blocks[position]
        if isinstance(block, TextBlock | ReasoningBlock):
            block.text += text
        else:
            block.arguments += text
        if position == len(self.blocks) - 1 and self._open:
            steps.append(Grew(position, block, text))
        else:  # a piece for a call already closed: kept in the body, too late for the stream
            log.warning("tool-call piece for a closed call (block %d); not streamed", position)
