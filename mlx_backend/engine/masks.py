"""One decode step's grammar masks: every constrained row's at once, computed while the forward pass runs and
applied on the device.

A step (of a batch, or of a request alone) goes, on the MLX thread:
1. the forward pass starts (`mx.async_eval(logits)`): it needs the tokens the step feeds, not the masks;
2. those tokens are read: they were sampled by the previous step and queued before this forward pass, so
   this waits for the previous step only; each row's matcher consumes its own;
3. llguidance computes every row's bitmask in one call, into one preallocated int32 array (its own threads,
   the GIL released), while the device runs the forward pass;
4. the bitmask goes to the device as it is (one bit a token) and is unpacked there (on the CPU backend,
   numpy unpacks it); each row's logits are masked with one `mx.where`. No per-row host round trip, no loop
   over the vocabulary in Python.

When a matcher advances: a matcher consumes exactly the tokens fed to the model. With one token in flight,
the token a step samples is handed out while the next step already runs, and is consumed in the step that
feeds it (step t consumes the token of step t-1, then computes the mask for step t). The last token of a
request (its EOS, or the one that uses up max_tokens) is handed out and never fed, so never consumed:
`ConstraintProcessor.is_accepting` describes the tokens fed so far.

The batcher plans a batch's step (`MaskStep` over the rows whose processors have started) before it runs it;
a processor that was not planned (a request alone, a row's first step, mlx-lm driven directly) makes a step
of its own row (`ConstraintProcessor.__call__`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Protocol

import mlx.core as mx
import numpy as np
from llguidance import LLExecutor, LLMatcher

__all__ = ["MaskStep", "allowed_tokens", "fill_bitmask", "plan_rows"]

_async_eval: Callable[..., None] = mx.async_eval  # untyped in mlx


class Bitmasks(Protocol):
    """What a step needs of the rows' grammar compiler (`constrained.GrammarCompiler`)."""

    eos_words: np.ndarray  # the bitmask that allows only EOS

    def bitmask(self, rows: int) -> np.ndarray: ...


class MaskRow(Protocol):
    """A row's part in a step (`constrained.ConstraintProcessor`), called in this order."""

    @property
    def compiler(self) -> Bitmasks: ...

    def plan(self, step: MaskStep | None) -> None: ...

    def prepare(self, token: int | None) -> LLMatcher | None: ...

    def check(self, words: np.ndarray) -> bool: ...

    def finish(self, masked: mx.array, logits: mx.array) -> mx.array: ...


class MaskStep:
    """The masks of one step's constrained rows. `fed` holds the tokens the step feeds (lazy: the previous
    step's samples), `positions[i]` the place of row i's token in it; None for a first step (the prompt is
    fed: nothing to consume). The first row to ask (`masked`) computes every row's mask."""

    def __init__(self, rows: Sequence[MaskRow], fed: mx.array | None, positions: Sequence[int]) -> None:
        self._rows = list(rows)
        self._slot = {id(row): i for i, row in enumerate(self._rows)}
        self._fed = fed
        self._positions = list(positions)
        self._allowed: mx.array | None = None

    def masked(self, row: MaskRow, logits: mx.array) -> mx.array:
        """`row`'s logits (1, width) with -inf wherever its grammar allows no token."""
        if self._allowed is None:
            _async_eval(logits)  # the forward pass of the whole batch (a row's logits are a slice of it)
            self._allowed = self._compute(logits.shape[-1])
        masked = mx.where(self._allowed[self._slot[id(row)]], logits, -mx.inf)
        return row.finish(masked, logits)

    def _compute(self, width: int) -> mx.array:
        fed: list[int] | None = None
        if self._fed is not None:
            fed = self._fed.tolist()  # type: ignore[assignment]  # waits for the previous step only
        compiler = self._rows[0].compiler
        bitmask = compiler.bitmask(len(self._rows))
        live: list[tuple[LLMatcher, int]] = []
        for i, row in enumerate(self._rows):
            matcher = row.prepare(None if fed is None else fed[self._positions[i]])
            if matcher is None:
                bitmask[i] = compiler.eos_words
            else:
                live.append((matcher, i))
        fill_bitmask(live, bitmask)
        for i, row in enumerate(self._rows):
            if not row.check(bitmask[i]):
                bitmask[i] = compiler.eos_words
        return allowed_tokens(bitmask, width)


def plan_rows(rows: Sequence[tuple[int, MaskRow]], fed: mx.array) -> MaskStep:
    """Plan a batch step: `rows` are (the row's place in `fed`, its processor), processors that have
    started. Reading nothing yet: `fed` is only queued (before the forward pass that will need it)."""
    _async_eval(fed)  # a no-op if the previous step already queued it as it is
    step = MaskStep([p for _, p in rows], fed, [i for i, _ in rows])
    for _, processor in rows:
        processor.plan(step)
    return step


def fill_bitmask(rows: list[tuple[LLMatcher, int]], bitmask: np.ndarray) -> None:
    """Each (matcher, row)'s next-token bitmask into `bitmask[row]` (C-contiguous int32, one row per matcher's
    mask), in one call that releases the GIL; several rows on llguidance's threads."""
    if len(rows) == 1:
        matcher, i = rows[0]
        matcher.unsafe_compute_mask_ptr(bitmask[i].ctypes.data, bitmask[i].nbytes)
    elif rows:
        _executor().unsafe_compute_mask_ptr(rows, bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0])


def allowed_tokens(bitmask: np.ndarray, width: int) -> mx.array:
    """The bitmask (rows, words) as booleans (rows, width): bit b of word w is token 32 w + b (little-endian).
    Tokens past the bitmask (the embedding's padding) are not allowed. On a GPU the words go to the device
    as they are and are unpacked there; on the CPU numpy unpacks them faster than MLX's CPU kernels."""
    if mx.default_device().type == mx.cpu:
        return unpacked_on_host(bitmask, width)
    return unpacked_on_device(bitmask, width)


def unpacked_on_device(bitmask: np.ndarray, width: int) -> mx.array:
    rows, words = bitmask.shape
    bits = (mx.array(bitmask)[:, :, None] >> mx.arange(32, dtype=mx.int32)) & 1
    flat = bits.reshape(rows, words * 32)
    if words * 32 >= width:
        flat = flat[:, :width]
    else:
        flat = mx.concatenate([flat, mx.zeros((rows, width - words * 32), dtype=flat.dtype)], axis=1)
    return flat.astype(mx.bool_)


def unpacked_on_host(bitmask: np.ndarray, width: int) -> mx.array:
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, count=width, bitorder="little")  # zeros past the words
    return mx.array(bits.view(np.bool_))


@functools.cache
def _executor() -> LLExecutor:
    return LLExecutor()
