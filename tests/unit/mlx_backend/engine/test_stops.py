"""Stop strings on decoded text: property tests against a plain reference (cut at the first stop)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_backend.engine.stops import StopMatcher

ALPHABET = "ab\n😀"  # few letters make overlaps and partial matches common


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Read one character at a time; stop at the first stop string that completes (longest on a tie)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)], True
    return text, False


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


def test_first_completed_stop_wins_whatever_the_token_boundaries() -> None:
    assert StopMatcher(["bc", "a"]).feed("xabc") == ("x", True)
    assert StopMatcher(["\nba", "b"]).feed("a\nba") == ("a\n", True)  # "b" completes before "\nba"
    matcher = StopMatcher(["\nba", "b"])
    assert matcher.feed("a\n") == ("a", False)
    assert matcher.feed("ba") == ("\n", True)
    assert StopMatcher(["abc", "bc"]).feed("abc") == ("", True)  # both complete at once: the longer one


def test_the_stop_string_that_matched_is_named() -> None:
    matcher = StopMatcher(["END", "\n\n"])
    assert matcher.matched is None
    matcher.feed("one EN")
    assert matcher.matched is None
    matcher.feed("D two")
    assert matcher.matched == "END"
    overlapping = StopMatcher(["\nba", "b"])
    overlapping.feed("a\nba")
    assert overlapping.matched == "b"  # the one that completed first


def test_no_stops_passes_through() -> None:
    assert StopMatcher(["", ""]).feed("abc") == ("abc", False)
    assert StopMatcher([]).feed("") == ("", False)


def test_stop_at_the_very_start() -> None:
    assert StopMatcher(["\n\n"]).feed("\n\nrest") == ("", True)
