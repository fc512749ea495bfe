"""The incremental tool-call parser: what each family's models write comes back as OpenAI tool calls, with
the same result whether the text arrives whole or in any pieces, and markup never in the content."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.tool_parsers import json_tools, mistral

from mlx_backend.engine.tools import families, parse_reply
from mlx_backend.engine.tools.families import Family
from tests.unit.mlx_backend.engine.tools.replies import (
    FAMILIES,
    PYTHONIC,
    TOOL_NAMES,
    Reply,
    arguments_text,
    collect,
    parser,
    split,
    stream,
    write,
)

H, L, MJ, MA = families.HERMES, families.LLAMA3_JSON, families.MISTRAL_JSON, families.MISTRAL_ARGS
MARKERS = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "<|tool_call_start|>")


def calls_of(reply: Reply) -> list[tuple[str, Any]]:
    return [(c["name"], json.loads(c["arguments"])) for c in reply.calls]


def every_two_way_split(family: Family, text: str, **options: Any) -> Reply:
    """The reply, checked to be the same for the whole text and for every split into two pieces."""
    whole = stream(lambda: parser(family, **options), [text])
    for cut in range(1, len(text)):
        assert stream(lambda: parser(family, **options), [text[:cut], text[cut:]]) == whole, cut
    one_at_a_time = stream(lambda: parser(family, **options), list(text))
    assert one_at_a_time.content == whole.content and one_at_a_time.calls == whole.calls
    return whole


def assert_openai_shape(reply: Reply) -> None:
    """What LangChain's chunk merge needs: a first piece with id, name and some arguments; then arguments only."""
    seen: set[int] = set()
    for delta in reply.deltas:
        if delta.index not in seen:
            assert delta.index == len(seen)
            assert delta.id is not None and delta.id.startswith("call_")
            assert delta.name in TOOL_NAMES
            assert delta.arguments, "a first piece with empty arguments fires LangChain's call early (#38682)"
            seen.add(delta.index)
        else:
            assert delta.id is None and delta.name is None
    for call in reply.calls:
        assert json.loads(call["arguments"]) is not None, "zero-argument calls are '{}', never ''"


# ---- each family, as its models write calls -----------------------------------------------------------------

TRICKY_ARGUMENTS = {"city": 'Par"is } {[</tool_call>]', "note": "ünïcødé ✓ 😀", "n": -1.5e3, "list": [{}, []],
                    "t": True, "z": None}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_one_call_with_tricky_arguments_at_every_split(family: Family) -> None:
    text = write(family, [("get_weather", json.dumps(TRICKY_ARGUMENTS, ensure_ascii=False))])
    reply = every_two_way_split(family, text)
    assert reply.content == ""
    assert calls_of(reply) == [("get_weather", TRICKY_ARGUMENTS)]
    assert_openai_shape(reply)


@pytest.mark.parametrize("family", [H, MJ, MA], ids=lambda f: f.name)
def test_two_parallel_calls_after_some_content(family: Family) -> None:
    text = write(family, [("add", '{"a": 1, "b": 2}'), ("noop", "{}")], before="Let me check both.\n")
    reply = every_two_way_split(family, text)
    assert reply.content == "Let me check both."
    assert calls_of(reply) == [("add", {"a": 1, "b": 2}), ("noop", {})]
    assert [c["id"] for c in reply.calls] == ["call_0", "call_1"]
    assert_openai_shape(reply)
    assert not reply.done


def test_llama_bare_json_is_a_call_only_when_it_is_one() -> None:
    assert calls_of(every_two_way_split(L, '\n {"name": "add", "parameters": {"a": 1}}')) == [("add", {"a": 1})]
    assert calls_of(every_two_way_split(L, '{"name": "add", "arguments": {"a": 1}}')) == [("add", {"a": 1})]
    # A JSON answer is the model's content, as is JSON that names no tool of the request.
    for text in ['{"answer": 42}', ' {"name": "other", "parameters": {}} is JSON', "{not json", '{"name": 1}']:
        reply = every_two_way_split(L, text)
        assert (reply.content, reply.calls) == (text, []), text
    # After <|python_tag|>, a call may follow text.
    reply = every_two_way_split(L, 'Sure. <|python_tag|>{"name": "noop", "parameters": {}}')
    assert (reply.content, calls_of(reply)) == ("Sure.", [("noop", {})])


def test_llama_stops_after_its_one_call() -> None:
    """Llama's template renders one call per turn, so the parser ends the reply there."""
    reply = stream(lambda: parser(L), ['{"name": "add", "parameters": {"a": 1}}', '; {"name": "noop"}'])
    assert calls_of(reply) == [("add", {"a": 1})] and reply.done


def test_mistral_reads_both_layouts_whichever_family_it_detected() -> None:
    json_layout = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}, "id": "a1b2c3d4e"}]'
    args_layout = '[TOOL_CALLS]add[CALL_ID]a1b2c3d4e[ARGS]{"a": 1}'
    for family in (MJ, MA):
        for text in (json_layout, args_layout):
            assert calls_of(every_two_way_split(family, text)) == [("add", {"a": 1})]


def test_key_order_and_arguments_as_a_json_string() -> None:
    reply = every_two_way_split(H, '<tool_call>{"arguments": {"a": [1, 2]}, "name": "add"}</tool_call>')
    assert calls_of(reply) == [("add", {"a": [1, 2]})]
    reply = every_two_way_split(MJ, '[TOOL_CALLS][{"name": "add", "arguments": "{\\"a\\": 1}"}]')
    assert calls_of(reply) == [("add", {"a": 1})]
    assert_openai_shape(reply)


def test_a_call_without_arguments_gets_an_empty_object() -> None:
    reply = every_two_way_split(H, '<tool_call>\n{"name": "noop"}\n</tool_call>')
    assert reply.calls[0]["arguments"] == "{}"
    assert_openai_shape(reply)


def test_arguments_stream_as_they_arrive() -> None:
    p = parser(H)
    first = p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert first.tool_calls[0].name == "get_weather" and first.tool_calls[0].arguments == '{"ci'
    assert p.feed('ty": "Ro').tool_calls[0].arguments == 'ty": "Ro'
    assert p.feed('me"}}\n</tool_call>').tool_calls[0].arguments == 'me"}'


def test_text_that_might_be_a_marker_is_held_until_it_is_not() -> None:
    p = parser(H)
    assert p.feed("Hello <tool_").content == "Hello"
    assert p.feed("box>").content == " <tool_box>"
    p = parser(H)
    assert p.feed("Hello <tool_").content == "Hello"
    assert p.finish().content == " <tool_"


def test_whitespace_around_markup_is_not_content_but_plain_text_keeps_its_own() -> None:
    assert every_two_way_split(H, "Answer:\n\n  A  \n").content == "Answer:\n\n  A  \n"
    text = 'Before.  \n<tool_call>{"name": "noop"}</tool_call>\n\n<tool_call>{"name": "noop"}</tool_call>\n After.'
    assert every_two_way_split(H, text).content == "Before.After."


# ---- malformed output -------------------------------------------------------------------------------------

MALFORMED = [
    # (family, text, content, calls, dropped)
    (H, '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>Hi', "Hi", [], 1),
    (H, "<tool_call>\nnot json at all\n</tool_call> Hi", "Hi", [], 1),
    (H, "<tool_call>{'name': 'add', 'arguments': {'a': 1}}</tool_call>", "", [], 1),
    (H, '<tool_call>{"name": "add", "arguments": [1]}</tool_call>', "", [], 1),
    (H, '<tool_call>{"arguments": {"a": 1}}</tool_call>', "", [], 1),
    (H, '<tool_call>{"name": "add", "arguments": {"a": 1}</tool_call>ok', "ok", [("add", '{"a": 1}')], 0),
    (H, '<tool_call>{"name": "add", "arguments": {"a": 1, oops}}</tool_call>ok', "ok", [("add", '{"a": 1, ')], 0),
    (H, '<tool_call>{"name": "add", "arguments": {"a": [1, 2', "", [("add", '{"a": [1, 2')], 0),
    (H, '<tool_call>{"name": "ad', "", [], 1),
    (MJ, "[TOOL_CALLS]garbage", "", [], 1),
    (MJ, '[TOOL_CALLS][{"name": "nope", "arguments": {}}, {"name": "add", "arguments": {}}]', "",
     [("add", "{}")], 1),
    (MA, '[TOOL_CALLS]nope[ARGS]{"a": 1}[TOOL_CALLS]add[ARGS]{"a": 2} then text', "then text",
     [("add", '{"a": 2}')], 1),
    (L, '{"name": "add", "parameters": {"a": 1} trailing', "", [("add", '{"a": 1}')], 0),
]


@pytest.mark.parametrize(("family", "text", "content", "calls", "dropped"), MALFORMED)
def test_malformed_markup_is_dropped_or_cut_never_content(family: Family, text: str, content: str,
                                                         calls: list[tuple[str, str]], dropped: int) -> None:
    reply = every_two_way_split(family, text)
    assert reply.content == content
    assert [(c["name"], c["arguments"]) for c in reply.calls] == calls
    whole = parse_reply(parser(family), text)
    assert whole.dropped == dropped
    assert all(c.complete == _valid_json(c.arguments) for c in whole.calls)


def _valid_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


# ---- request options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [H, MJ, MA], ids=lambda f: f.name)
def test_parallel_false_ends_the_reply_after_the_first_call(family: Family) -> None:
    text = write(family, [("add", '{"a": 1}'), ("noop", "{}")])
    p = parser(family, parallel=False)
    outputs = [p.feed(ch) for ch in text]
    reply = collect([*outputs, p.finish()])
    assert calls_of(reply) == [("add", {"a": 1})]
    assert reply.done
    # "done" comes with the character that completes the first call, so the batcher stops right there.
    first_done = next(i for i, o in enumerate(outputs) if o.done)
    assert text[: first_done + 1].endswith("}") and "noop" not in text[: first_done + 1]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_suppressed_calls_come_out_as_nothing(family: Family) -> None:
    """tool_choice "none": whatever the model writes, no call comes out and no markup shows."""
    text = write(family, [("add", '{"a": 1}')], before="Text." if family is not L else "")
    reply = every_two_way_split(family, text, suppress=True)
    assert reply.calls == [] and not reply.done
    assert reply.content == ("Text." if family is not L else text)  # a bare JSON reply is content then


def test_only_the_request_s_tools_are_called() -> None:
    reply = stream(lambda: parser(H, names=["noop"]), [write(H, [("add", "{}"), ("noop", "{}")])])
    assert calls_of(reply) == [("noop", {})]


def test_mlx_lm_parsers_read_the_other_formats() -> None:
    text = 'Sure.<|tool_call_start|>[get_weather(city="Paris"), add(a=1, b=2)]<|tool_call_end|>'
    reply = every_two_way_split(PYTHONIC, text)
    assert reply.content == "Sure."
    assert calls_of(reply) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert_openai_shape(reply)
    assert every_two_way_split(PYTHONIC, "<|tool_call_start|>[not python(]<|tool_call_end|>x").calls == []


# ---- properties ---------------------------------------------------------------------------------------

arguments = st.dictionaries(
    st.text(alphabet='ab"\\{}[]<>/ ü😀', max_size=4),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(alphabet='x"{}[]\\<>:, \n😀', max_size=6),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(alphabet="kv", max_size=2), c, max_size=2),
                 max_leaves=6),
    max_size=4,
)
# Content made of characters that cannot spell any marker, with the marker's own punctuation in it.
content = st.text(alphabet='ab <>[]{}|/"\n😀', max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    before=content,
    calls=st.lists(st.tuples(st.sampled_from(TOOL_NAMES), arguments, st.booleans(), st.booleans()), max_size=3),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_any_reply_in_any_pieces_gives_back_exactly_its_content_and_calls(
    family: Family, before: str, calls: list[tuple[str, dict[str, Any], bool, bool]], cuts: list[int]
) -> None:
    if family is L:
        calls = calls[:1]
    written = [(name, arguments_text(args, compact, ascii_only)) for name, args, compact, ascii_only in calls]
    text = write(family, written, before=before)
    reply = stream(lambda: parser(family), split(text, cuts))
    assert reply == stream(lambda: parser(family), [text])
    assert [(c["name"], c["arguments"]) for c in reply.calls] == written  # arguments as the model wrote them
    # Content as written; only the whitespace between it and the calls goes.
    assert reply.content == (before.rstrip() if calls else before)
    assert not any(marker in reply.content for marker in MARKERS)
    assert_openai_shape(reply)


@settings(max_examples=600, deadline=None)
@given(text=st.text(alphabet='<tool_call>/{}[]"name:arguments, \n\\TOLCAS|python_g', max_size=60),
       family=st.sampled_from(FAMILIES), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_any_text_at_all_parses_the_same_in_any_pieces(text: str, family: Family, cuts: list[int]) -> None:
    """Garbage included: a random model may write anything."""
    whole = stream(lambda: parser(family), [text])
    assert stream(lambda: parser(family), split(text, cuts)) == whole
    for call in whole.calls:
        assert call["name"] in TOOL_NAMES


# ---- cross-checks with mlx-lm's own parsers --------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(TOOL_NAMES), args=arguments)
def test_hermes_and_mistral_calls_read_as_mlx_lm_reads_them(name: str, args: dict[str, Any]) -> None:
    block = json.dumps({"name": name, "arguments": args})
    assert json_tools.parse_tool_call(block) == {"name": name, "arguments": args}
    assert calls_of(stream(lambda: parser(H), [f"<tool_call>{block}</tool_call>"])) == [(name, args)]
    header = f"{name}[ARGS]{json.dumps(args)}"
    assert mistral.parse_tool_call(header) == {"name": name, "arguments": args}
    assert calls_of(stream(lambda: parser(MA), [f"[TOOL_CALLS]{header}"])) == [(name, args)]
