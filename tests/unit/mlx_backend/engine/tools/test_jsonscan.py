"""The incremental JSON validator agrees with json.loads on every text, one character at a time."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_backend.engine.tools.jsonscan import JsonScanner, Step

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)
containers = st.one_of(st.lists(json_values, max_size=4), st.dictionaries(st.text(max_size=5), json_values, max_size=4))


def scan(text: str) -> list[Step]:
    scanner = JsonScanner()
    return [scanner.feed(ch) for ch in text]


@settings(max_examples=400, deadline=None)
@given(value=containers, indent=st.sampled_from([None, 2]), ascii_only=st.booleans())
def test_valid_json_is_accepted_and_done_exactly_at_its_last_character(value: object, indent: int | None,
                                                                      ascii_only: bool) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    steps = scan(text)
    assert steps[-1] is Step.DONE
    assert all(step is Step.MORE for step in steps[:-1])


@settings(max_examples=1500, deadline=None)
@given(text=st.text(alphabet='{}[]",:0123456789.eE+-truefalsn \\u\n', max_size=14))
def test_on_any_text_the_verdict_is_json_loads_verdict(text: str) -> None:
    steps = scan(text)
    accepted = 0
    for step in steps:
        if step is not Step.MORE:
            break
        accepted += 1
    try:
        value = json.loads(text)
        complete = isinstance(value, (dict, list, str))
    except json.JSONDecodeError:
        complete = False
    if complete and text == text.rstrip():
        # the whole text is one value: accepted, done at its last character
        assert steps and steps[-1] is Step.DONE and accepted == len(text) - 1
    if Step.DONE in steps:  # where the scanner says a value is complete, it is valid JSON
        assert _loads_ok(text[: steps.index(Step.DONE) + 1])
    if Step.ERROR in steps:
        # where the scanner refuses, no valid JSON starts with what it read plus that character
        bad = steps.index(Step.ERROR)
        prefix = text[: bad + 1]
        assert not any(_loads_ok(prefix + tail) for tail in ('"', '"}', '"]', "]", "}", "0}", "0]", ":0}", '":0}'))


def _loads_ok(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


@pytest.mark.parametrize("text", ['{"a": 01}', '{"a" 1}', "{'a': 1}", '{"a": tru e}', '[1,]', '{"a": "\x01"}',
                                  '"\\x"', '{"a": 1.}', '{"a": -}', "{,}"])
def test_invalid_json_is_refused_at_the_first_bad_character(text: str) -> None:
    assert Step.ERROR in scan(text)


def test_a_top_level_number_is_refused_by_default_but_ends_when_allowed() -> None:
    assert scan("1") == [Step.ERROR]
    scanner = JsonScanner(top_level="0123456789")
    assert [scanner.feed(ch) for ch in "12 "] == [Step.MORE, Step.MORE, Step.ENDED]
    assert scanner.finished


def test_nested_depth_and_strings_are_tracked() -> None:
    scanner = JsonScanner()
    for ch in '{"a": ["}{':
        scanner.feed(ch)
    assert scanner.depth == 2 and scanner.in_string


def test_an_error_is_final() -> None:
    scanner = JsonScanner()
    assert [scanner.feed(ch) for ch in "{{}"] == [Step.MORE, Step.ERROR, Step.ERROR]


@settings(max_examples=200, deadline=None)
@given(value=containers, ascii_only=st.booleans())
def test_a_plain_run_is_exactly_what_feeding_one_character_at_a_time_would_accept_and_change_nothing(
    value: object, ascii_only: bool
) -> None:
    """`plain_run` (the tool parser takes a long argument's text at once): wherever the scanner stands, the
    characters it names are accepted one by one without leaving the string; the next one is a quote, a
    backslash or a control character (or the text ends)."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    scanner = JsonScanner()
    for i, ch in enumerate(text):
        run = scanner.plain_run(text, i)
        probe = JsonScanner()
        for earlier in text[:i]:
            probe.feed(earlier)
        for plain in text[i:i + run]:
            assert probe.feed(plain) is Step.MORE and probe.in_string
        assert run == 0 or i + run == len(text) or text[i + run] in '"\\' or ord(text[i + run]) < 0x20
        scanner.feed(ch)


def test_no_plain_run_outside_a_string_or_inside_an_escape() -> None:
    scanner = JsonScanner()
    for ch in '{"a':
        scanner.feed(ch)
    assert scanner.plain_run('{"abc"', 2) == 3  # "abc" up to the closing quote
    scanner.feed("\\")
    assert scanner.plain_run('n more', 0) == 0  # an escape is read a character at a time
    outside = JsonScanner()
    outside.feed("[")
    assert outside.plain_run("123", 0) == 0
