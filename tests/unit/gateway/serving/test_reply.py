"""A reply as blocks: text and tool calls opened, grown and closed in the order the engine sent them."""

from __future__ import annotations

from gateway.serving.reply import CallBlock, Closed, Grew, Opened, Reply, TextBlock
from mlx_backend.contract import Delta, ToolCallDelta


def delta(text: str = "", *calls: ToolCallDelta) -> Delta:
    return Delta("r", text, 1, calls)


def test_text_grows_one_block_and_closes_at_the_end() -> None:
    reply = Reply()
    first = reply.add(delta("Hel"))
    assert first == [Opened(0, TextBlock("Hel")), Grew(0, TextBlock("Hel"), "Hel")]
    assert reply.add(delta("lo")) == [Grew(0, TextBlock("Hello"), "lo")]
    assert first[0].block is reply.blocks[0]  # steps hold the live block: render what a step says, when it comes
    assert reply.add(delta()) == []
    assert reply.finish() == [Closed(0, TextBlock("Hello"))]
    assert reply.finish() == []
    assert reply.text == "Hello" and reply.calls == []


def test_a_call_closes_the_text_and_its_pieces_grow_its_arguments() -> None:
    reply = Reply()
    reply.add(delta("Let me check."))
    steps = reply.add(delta("", ToolCallDelta(0, "call_1", "f", '{"a"'), ToolCallDelta(0, arguments=": 1}")))
    call = CallBlock("call_1", "f", '{"a": 1}')
    assert steps == [Closed(0, TextBlock("Let me check.")), Opened(1, call), Grew(1, call, '{"a"'),
                     Grew(1, call, ": 1}")]
    steps = reply.add(delta("", ToolCallDelta(1, "call_2", "g", "{}")))
    assert steps == [Closed(1, call), Opened(2, CallBlock("call_2", "g", "{}")), Grew(2, CallBlock("call_2", "g", "{}"),
                                                                                       "{}")]
    assert [c.name for c in reply.calls] == ["f", "g"] and reply.text == "Let me check."


def test_text_after_a_call_opens_a_new_text_block() -> None:
    reply = Reply()
    reply.add(delta("", ToolCallDelta(0, "call_1", "f", "{}")))
    steps = reply.add(delta("done"))
    assert [type(s) for s in steps] == [Closed, Opened, Grew] and steps[1].position == 1
    assert [type(b) for b in reply.blocks] == [CallBlock, TextBlock]


def test_pieces_of_a_call_that_never_started_are_dropped() -> None:
    reply = Reply()
    assert reply.add(delta("", ToolCallDelta(3, arguments="{}"))) == []
    assert reply.blocks == []


def test_a_late_piece_for_a_closed_call_is_kept_in_the_body_but_not_streamed() -> None:
    reply = Reply()
    reply.add(delta("", ToolCallDelta(0, "call_1", "f", '{"a": ')))
    reply.add(delta("", ToolCallDelta(1, "call_2", "g", "{}")))
    assert reply.add(delta("", ToolCallDelta(0, arguments="1}"))) == []
    assert reply.calls[0].arguments == '{"a": 1}'
