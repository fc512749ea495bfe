"""One model's saved KV caches, keyed by their tokens: find the one that shares the longest prefix with a new
prompt, least recently used dropped first. MLX thread only.

Why not mlx-lm's `LRUPromptCache`: its lookup walks, below the shared prefix, every saved sequence token by
token, copying a list per step. With many requests sharing a system prompt (every chat template, every coding
agent) that walk held the MLX thread 45% of the time at 64 clients on an H100 (py-spy, docs/benchmarks.md).
Here each saved sequence is a numpy array and a lookup is one vectorised comparison per entry (at most
`max_entries`), so it costs microseconds per entry whatever the prompts share.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache


@dataclass
class _Entry:
    tokens: np.ndarray[Any, np.dtype[np.int32]]
    prompt_cache: list[Any]
    nbytes: int
    trimmable: bool


def shared_prefix(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PromptStore:
    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next_id = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        """A copy of the cache sharing the longest usable prefix with `tokens`, cut to that prefix, and the
        tokens still to feed (at least one: the model must be fed something). A saved sequence longer than
        the shared part is usable only if its cache can be trimmed back."""
        if not tokens or not self._entries:
            return None, tokens
        wanted = np.asarray(tokens, dtype=np.int32)
        best_id, best_len = -1, 0
        for entry_id, entry in self._entries.items():
            usable = min(shared_prefix(entry.tokens, wanted), len(tokens) - 1)
            if usable < len(entry.tokens) and not entry.trimmable:
                continue
            if usable > best_len or (usable == best_len and best_id >= 0
                                     and len(entry.tokens) < len(self._entries[best_id].tokens)):
                best_id, best_len = entry_id, usable  # ties: the shorter cache, less to trim
        if best_id < 0:
            return None, tokens
        self._entries.move_to_end(best_id)
        entry = self._entries[best_id]
        prompt_cache = copy.deepcopy(entry.prompt_cache)
        if len(entry.tokens) > best_len:
            trim_prompt_cache(prompt_cache, len(entry.tokens) - best_len)
        return prompt_cache, tokens[best_len:]

    def save(self, tokens: list[int], prompt_cache: list[Any]) -> None:
        """Keep `prompt_cache` (the KV cache of exactly `tokens`). A trimmable cache makes every saved
        prefix of it redundant, so those go; the same tokens saved again replace the older entry."""
        key = np.asarray(tokens, dtype=np.int32)
        trimmable = can_trim_prompt_cache(prompt_cache)
        for entry_id, entry in list(self._entries.items()):
            is_prefix = len(entry.tokens) <= len(key) and shared_prefix(entry.tokens, key) == len(entry.tokens)
            if is_prefix and (trimmable or len(entry.tokens) == len(key)):
                self._drop(entry_id)
        nbytes = sum(int(c.nbytes) for c in prompt_cache)
        self._entries[self._next_id] = _Entry(key, prompt_cache, nbytes, trimmable)
        self._next_id += 1
        self.nbytes += nbytes
        while len(self._entries) > self._max_entries:
            self._drop(next(iter(self._entries)))

    def trim_to(self, n_bytes: int) -> None:
        """Drop the least recently used entries until at most `n_bytes` are kept."""
        while self._entries and self.nbytes > n_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, entry_id: int) -> None:
        self.nbytes -= self._entries.pop(entry_id).nbytes
