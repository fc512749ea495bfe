"""Helpers shared by the benchmark scripts: prompts, percentiles, JSON decoding. No MLX, no HTTP."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:  # msgspec is a gateway dependency and parses SSE chunks several times faster than json
    import msgspec

    _decoder = msgspec.json.Decoder()
    msgspec_error: type[Exception] = msgspec.DecodeError

    def loads(data: bytes | str) -> Any:
        return _decoder.decode(data)

except ImportError:  # pragma: no cover - only where msgspec is absent
    msgspec_error = ValueError

    def loads(data: bytes | str) -> Any:
        return json.loads(data)


# Added to each EOS logit when a random model must be kept from stopping early: OpenAI's bound for
# logit_bias, far below the logits of a random model, and sent over HTTP as the same number.
EOS_BIAS = -100.0


def make_prompt(words: Sequence[str], n_words: int, index: int) -> str:
    """Prompt `index` of a run: `n_words` words drawn with a per-index seed.

    Every request gets its own text, so no server can serve a prompt from a prefix cache that the
    in-process ceiling did not have; with the factory's WordLevel tokenizer each word is one token,
    so every prompt has the same length.
    """
    rng = random.Random(1_000_003 * (index + 1))
    return " ".join(rng.choice(words) for _ in range(n_words))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (q / 100) * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def cpu_model() -> str:
    """The CPU's model name, for a run's record (Linux's /proc/cpuinfo; else what platform knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
