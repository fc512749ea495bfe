"""Prefill pieces sized to the device's speed: about `piece_s` each, within bounds, grown with care, shrunk at
once; fixed when pacing is off (an engine group's ranks must run the same pieces)."""

from __future__ import annotations

from mlx_backend.engine.pacing import FIRST_TOKENS, MAX_GROWTH, MIN_TOKENS, PrefillPacer


def test_a_fresh_pacer_starts_small_until_it_has_measured_the_device() -> None:
    assert PrefillPacer(2048, 1.0).size == FIRST_TOKENS
    assert PrefillPacer(8, 1.0).size == 8  # never past the largest piece


def test_a_slow_piece_shrinks_the_next_to_take_about_piece_s() -> None:
    pacer = PrefillPacer(2048, 1.0)
    pacer.observe(256, 4.0)  # 64 tokens a second
    assert pacer.size == 64


def test_a_fast_piece_grows_the_next_but_at_most_max_growth_times() -> None:
    pacer = PrefillPacer(2048, 1.0)
    pacer.observe(FIRST_TOKENS, 0.001)
    assert pacer.size == FIRST_TOKENS * MAX_GROWTH
    for _ in range(4):
        pacer.observe(pacer.size, 0.001)
    assert pacer.size == 2048  # the configured step size bounds it


def test_a_short_tail_only_ever_shrinks_the_size() -> None:
    pacer = PrefillPacer(2048, 1.0)
    pacer.observe(10, 0.001)  # a prompt's last few tokens: fast, but says nothing about a full piece
    assert pacer.size == FIRST_TOKENS
    pacer.observe(100, 2.0)  # slow even so: 50 tokens a second
    assert pacer.size == 48  # rounded down to whole multiples of 16


def test_a_very_slow_device_still_gets_pieces_of_min_tokens() -> None:
    pacer = PrefillPacer(2048, 1.0)
    pacer.observe(256, 600.0)
    assert pacer.size == MIN_TOKENS


def test_the_size_follows_the_speed_as_the_context_grows() -> None:
    """Deeper into a prompt each token costs more (attention): pieces shrink to keep their time."""
    pacer = PrefillPacer(2048, 1.0)
    per_token_s = 0.001
    sizes, times = [], []
    for _ in range(20):  # to 38 ms a token: the pieces stay above MIN_TOKENS
        size = pacer.size
        sizes.append(size)
        times.append(size * per_token_s)
        pacer.observe(size, size * per_token_s)
        per_token_s *= 1.2
    assert max(times) <= 1.0 * 1.2  # none longer than piece_s and one step's growth in cost
    assert max(sizes) >= 512 and pacer.size <= max(sizes) / 8


def test_without_pacing_the_pieces_are_fixed() -> None:
    for pacer in (PrefillPacer.fixed(512), PrefillPacer(512, 0.0)):
        pacer.observe(512, 60.0)
        assert pacer.size == 512
