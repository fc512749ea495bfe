"""Keep-alive rules: a default, per-model overrides by id or glob (first match wins), 0 and -1."""

from __future__ import annotations

import pytest

from mlx_backend.keep_alive import KeepAlive, matches, parse_override


def test_overrides_by_id_or_glob_first_match_wins() -> None:
    policy = KeepAlive.parse(1800, ["org/special=60", "org/*=-1", "*-4bit=0"])
    assert policy.for_model("org/special") == 60
    assert policy.for_model("org/other") == -1
    assert policy.for_model("llama-4bit") == 0
    assert policy.for_model("plain") == 1800


def test_expiry_counts_from_the_last_use() -> None:
    policy = KeepAlive(100.0, (("now", 0.0), ("keep", -1.0)))
    assert policy.expires_at("m", 50.0, pinned=False, busy=False) == 150.0
    assert policy.expires_at("now", 50.0, pinned=False, busy=False) == 50.0  # 0: as soon as it is idle
    assert policy.expires_at("keep", 50.0, pinned=False, busy=False) is None  # -1: never by itself
    assert policy.expires_at("m", 50.0, pinned=True, busy=False) is None
    assert policy.expires_at("m", 50.0, pinned=False, busy=True) is None


def test_parse_override_names_the_problem() -> None:
    assert parse_override("org/name=90") == ("org/name", 90.0)
    assert parse_override(" a=b=1.5 ") == ("a=b", 1.5)  # the last '=' splits: ids never end in '=...'
    for bad, why in [("name", "ID=SECONDS"), ("=5", "ID=SECONDS"), ("name=soon", "not a number"),
                     ("name=nan", "not a number")]:
        with pytest.raises(ValueError, match=why):
            parse_override(bad)


def test_matches_is_exact_or_glob_and_case_sensitive() -> None:
    assert matches("org/name", "org/name")
    assert matches("org/*", "org/name")
    assert not matches("org/*", "other/name")
    assert not matches("Org/*", "org/name")
    assert matches("[a]b", "ab") and matches("[a]b", "[a]b")  # an id that looks like a glob still matches itself
