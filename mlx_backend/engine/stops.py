"""Stop strings matched on decoded text, for one request. Pure Python.

A stop string can span tokens, so text that could be the start of a stop string is held back until the
next segment shows whether it is. The stop string itself is never emitted, nor anything after it. When stop
strings overlap, the one that completes first wins, wherever the token boundaries fall.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)  # an empty stop string would stop at once: ignore it
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def feed(self, text: str) -> tuple[str, bool]:
        """Take the next decoded segment; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        # The first stop string to complete wins (as if the text arrived one character at a time), so the
        # result does not depend on how the text was split into tokens. No match can start in text
        # already emitted: every suffix that could begin one was held back.
        ends = [(i + len(s), i) for s in self._stops if (i := buffer.find(s)) >= 0]
        if ends:
            end, cut = min(ends)
            self.matched = buffer[cut:end]
            self.stopped = True
            self._held = ""
            return buffer[:cut], True
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The generation ended without a stop: the held-back text is plain output after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    @property
    def held(self) -> int:
        return len(self._held)

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        for size in range(min(self._longest - 1, len(buffer)), 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
