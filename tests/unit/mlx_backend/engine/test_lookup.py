"""Draft tokens: what followed the text's last n-gram where it occurred before, the prediction first."""

from __future__ import annotations

from mlx_backend.engine.lookup import DraftLookup


def test_the_tokens_that_followed_the_last_n_gram_before_are_the_draft() -> None:
    lookup = DraftLookup([1, 2, 3, 4, 5, 9, 2, 3])
    assert lookup.draft(2) == [4, 5]
    assert lookup.draft(10) == [4, 5, 9, 2, 3]  # up to where the text ends


def test_no_earlier_occurrence_no_draft() -> None:
    assert DraftLookup([1, 2, 3, 4]).draft(4) == []
    assert DraftLookup([7]).draft(4) == []
    assert DraftLookup([]).draft(4) == []
    assert DraftLookup([1, 2, 1, 2]).draft(0) == []


def test_one_repeated_token_is_not_enough_to_draft() -> None:
    assert DraftLookup([5, 1, 6, 7, 1]).draft(3) == []


def test_a_longer_match_wins_over_a_later_shorter_one() -> None:
    # (2, 3) last occurred before 8; (1, 2, 3) before 4
    lookup = DraftLookup([1, 2, 3, 4, 0, 2, 3, 8, 1, 2, 3])
    assert lookup.draft(1) == [4]


def test_the_most_recent_occurrence_of_an_n_gram_wins() -> None:
    assert DraftLookup([1, 2, 7, 1, 2, 8, 1, 2]).draft(1) == [8]


def test_tokens_extended_one_at_a_time_draft_as_those_given_at_once() -> None:
    text = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 9, 2, 6, 5, 3, 1, 4, 1, 5]
    whole = DraftLookup(text)
    grown = DraftLookup(text[:1])
    for token in text[1:]:
        grown.extend([token])
    assert grown.draft(6) == whole.draft(6) == [9, 2, 6, 5, 3, 5]


def test_the_prediction_is_drafted_from_and_wins_over_the_sequence_at_the_same_length() -> None:
    lookup = DraftLookup([1, 2, 3, 9, 1, 2], source=[1, 2, 5, 6, 7])
    assert lookup.draft(3) == [5, 6, 7]


def test_a_sequence_that_follows_the_prediction_stays_aligned_with_it_where_the_prediction_repeats() -> None:
    # Two identical lines in the prediction: after the second line starts, the n-gram alone would point at the
    # last occurrence; alignment continues where the output is.
    line = [10, 11, 12, 13]
    prediction = [1, 2, *line, 3, *line, 4]
    lookup = DraftLookup([50, 1, 2], source=prediction)
    assert lookup.draft(5) == [10, 11, 12, 13, 3]
    lookup.extend([10, 11, 12, 13, 3, 10])
    assert lookup.draft(4) == [11, 12, 13, 4]


def test_a_sequence_that_leaves_the_prediction_drafts_from_n_grams_again() -> None:
    lookup = DraftLookup([0, 1, 2], source=[1, 2, 3, 4, 5])
    assert lookup.draft(2) == [3, 4]
    lookup.extend([7, 8])  # not the prediction's 3, 4
    assert lookup.draft(2) == []
    lookup.extend([4])  # (8, 4) occurs nowhere; but (3, 4) would: not a match either
    assert lookup.draft(2) == []
