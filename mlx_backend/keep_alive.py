"""How long an unused model stays loaded: one default, overridden per model by id or glob pattern. No MLX.

Seconds: a positive number keeps the model that long after its last request ends; 0 unloads it as soon as
its last request ends; -1 (or any negative number) keeps it until it is evicted for another model or
unloaded by hand. A pinned model is never idle-unloaded or evicted, whatever its keep-alive.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

FOREVER = -1.0


def matches(pattern: str, model_id: str) -> bool:
    """An exact id, or a shell-style glob (`org/*`, `*-4bit`); case-sensitive, as ids are."""
    return pattern == model_id or fnmatch.fnmatchcase(model_id, pattern)


def parse_override(text: str) -> tuple[str, float]:
    """`ID=SECONDS` (ID may be a glob) -> (ID, seconds); ValueError naming the problem."""
    pattern, sep, seconds = text.rpartition("=")
    pattern = pattern.strip()
    if not sep or not pattern:
        raise ValueError(f"model keep-alive {text!r} is not ID=SECONDS")
    try:
        value = float(seconds)
    except ValueError:
        raise ValueError(f"model keep-alive {text!r}: {seconds!r} is not a number of seconds") from None
    if value != value:  # NaN
        raise ValueError(f"model keep-alive {text!r}: not a number")
    return pattern, value


@dataclass(frozen=True)
class KeepAlive:
    default_s: float = 1800.0
    overrides: tuple[tuple[str, float], ...] = ()  # (id or glob, seconds): the first match wins

    @classmethod
    def parse(cls, default_s: float, overrides: Iterable[str]) -> KeepAlive:
        return cls(default_s, tuple(parse_override(o) for o in overrides))

    def for_model(self, model_id: str) -> float:
        for pattern, seconds in self.overrides:
            if matches(pattern, model_id):
                return seconds
        return self.default_s

    def expires_at(self, model_id: str, last_used: float, *, pinned: bool, busy: bool) -> float | None:
        """When an idle model is due to unload (same clock as `last_used`); None: not while pinned, busy or
        kept forever."""
        seconds = self.for_model(model_id)
        if pinned or busy or seconds < 0:
            return None
        return last_used + seconds
