"""Prefill pieces sized to the device's measured speed, so a long prompt shows progress often.

The gateway's stall clock (mlx_backend/client/engine.py) kills an engine whose progress counter stops moving while it
has work, and the counter moves once per prefill piece. A fixed piece of 2048 tokens takes ~50 ms on a GPU, but
a minute on a busy 2-core CPU deep into an agent's 12k-token prompt (attention grows with the context): a
healthy engine was killed there. So each model's pacer times the pieces it runs and sizes the next one to take
about `piece_s` seconds, a small fraction of the stall limit, between `MIN_TOKENS` and the configured step size.
It starts small (`FIRST_TOKENS`: on a busy CPU even 256 tokens of a small model took 5 s) and grows at most
`MAX_GROWTH` times per piece, since a piece costs more per token the deeper into the prompt it runs; it shrinks
at once when a piece was slow.

Wall time on purpose: the stall clock is wall time, and a busy machine is exactly where pieces must shrink.
An engine group's ranks must run the same pieces, so there the pacer is off (fixed pieces, `piece_s` 0).
"""

from __future__ import annotations

MIN_TOKENS = 16  # below this a piece costs mostly overhead; a device this slow still moves the clock per piece
FIRST_TOKENS = 16  # before anything is measured: 16, 64, 256, 1024, 2048 on a GPU (a few ms each)
MAX_GROWTH = 4
_ROUND = 16  # piece sizes in whole multiples, so there are few distinct shapes


class PrefillPacer:
    """The size of the next prefill piece of one model, learned from the pieces before it."""

    def __init__(self, max_tokens: int, piece_s: float) -> None:
        self.max_tokens = max(1, max_tokens)
        self.piece_s = piece_s  # 0: fixed pieces of max_tokens
        self.size = self.max_tokens if piece_s <= 0 else min(FIRST_TOKENS, self.max_tokens)

    @classmethod
    def fixed(cls, tokens: int) -> PrefillPacer:
        return cls(tokens, 0.0)

    def observe(self, tokens: int, seconds: float) -> None:
        """A piece of `tokens` tokens per prompt took `seconds`: size the next one. A piece shorter than the size
        (a prompt's tail) only ever shrinks it: its speed says nothing about a full piece's cost."""
        if self.piece_s <= 0 or tokens <= 0:
            return
        fits = tokens * self.piece_s / max(seconds, 1e-6)  # tokens that would have taken piece_s at this speed
        wanted = min(self.size, fits) if tokens < self.size else min(fits, self.size * MAX_GROWTH)
        size = max(MIN_TOKENS, int(wanted) // _ROUND * _ROUND)
        self.size = min(self.max_tokens, size)
