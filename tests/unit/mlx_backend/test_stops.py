"""Stop strings on decoded text: property tests against a plain reference (cut at the first stop)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_backend.stops import StopMatcher

ALPHABET = "ab\n😀"  # few letters make overlaps and partial matches common


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def run(segments: list[str], stops: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    out: list[str] = []
    stopped = False
    for segment in segments:
        emitted, stopped = matcher.feed(segment)
        out.append(emitted)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped, out


@settings(max_examples=1500, deadline=None)
@given(
    segments=st.lists(st.text(ALPHABET, max_size=4), max_size=12),
    stops=st.lists(st.text(ALPHABET, max_size=4), max_size=4),
)
def test_matches_reference(segments: list[str], stops: list[str]) -> None:
    text, stopped, _ = run(segments, stops)
    assert (text, stopped) == reference("".join(segments), stops)


@settings(max_examples=500, deadline=None)
@given(
    segments=st.lists(st.text(ALPHABET, max_size=5), max_size=12),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=4),
)
def test_holds_back_at_most_longest_minus_one(segments: list[str], stops: list[str]) -> None:
    matcher = StopMatcher(stops)
    longest = max(len(s) for s in stops)
    fed = ""
    emitted = ""
    for segment in segments:
        out, stopped = matcher.feed(segment)
        fed += segment
        emitted += out
        if stopped:
            break
        assert matcher.held <= longest - 1
        assert len(fed) - len(emitted) == matcher.held
        assert fed.startswith(emitted)


def test_stop_spanning_segments() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("hello E") == ("hello ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("D and more") == ("", True)
    assert matcher.feed("ignored") == ("", True)
    assert matcher.flush() == ""


def test_false_start_is_released() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("E") == ("", False)
    assert matcher.feed("NX") == ("ENX", False)
    assert matcher.feed("EN") == ("", False)
    assert matcher.flush() == "EN"


def test_earliest_stop_wins_and_no_stops_passes_through() -> None:
    assert StopMatcher(["bc", "a"]).feed("xabc") == ("x", True)
    assert StopMatcher(["", ""]).feed("abc") == ("abc", False)
    assert StopMatcher([]).feed("") == ("", False)


def test_stop_at_the_very_start() -> None:
    assert StopMatcher(["\n\n"]).feed("\n\nrest") == ("", True)
