"""One decode step's grammar masks: every constrained row's at once, computed while the forward pass runs and
applied on the device.

A step (of a batch, or of a request alone) goes, on the CPU all on the MLX thread:
1. the forward pass is queued (`mx.async_eval(logits)`): it needs the tokens the step feeds, not the masks;
2. those tokens are read: they were sampled by the previous step and queued before this forward pass, so
   this waits for the previous step only; each row's matcher consumes its own;
3. llguidance computes every row's bitmask in one call, into one preallocated int32 array (its own threads,
   the GIL released), while the device runs the forward pass (on a GPU: while it is launched, below);
4. the bitmask goes to the device as it is (one bit a token) and is unpacked there (on the CPU backend,
   numpy unpacks it); each row's logits are masked with one `mx.where`. No per-row host round trip, no loop
   over the vocabulary in Python.
On a GPU the order differs, so that the grammar's host work hides behind the launch instead of adding to it
(`MaskStep._compute`): queueing a small model's pass is the host launching a few hundred kernels, most of a
step's host time, and `mx.async_eval` releases the GIL meanwhile. So the MLX thread reads the tokens first
(the previous step has usually ended by then: the host built this step's whole graph since they were queued),
the mask thread consumes them and computes the bitmask (2 and 3) while the MLX thread queues the pass (1), and
4 follows. Where the device is the slower side (a large model), reading first idles it only until the first
of this step's kernels is launched: from then on the launches stay ahead of it again.

When a matcher advances: a matcher consumes exactly the tokens fed to the model. With one token in flight,
the token a step samples is handed out while the next step already runs, and is consumed in the step that
feeds it (step t consumes the token of step t-1, then computes the mask for step t). The last token of a
request (its EOS, or the one that uses up max_tokens) is handed out and never fed, so never consumed:
`ConstraintProcessor.is_accepting` describes the tokens fed so far.

The batcher plans a batch's step (`MaskStep` over its constrained rows, those joining in the step included:
a grammar that has not started consumes nothing) as the step begins; a processor that was not planned (a
request alone, a new row's first pass in mlx-lm's own generator) makes a step of its own row
(`ConstraintProcessor.__call__`).

The whole batch at once: a step's masks are one (batch, width) matrix, all true for a row without a grammar,
and `MaskStep.apply` masks the batch's logits with one `mx.where`. The batcher hands mlx-lm's generation step
a `MaskedForward` model that does this to the forward pass's last logits, and lets the rows whose only
processor is their grammar skip mlx-lm's per-row processor loop for that step (batcher.constrained_step);
a row that also has penalties or a logit bias keeps that loop, where its processor applies its own row of
the same matrix (after them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import mlx.core as mx
import numpy as np
from llguidance import LLExecutor, LLMatcher

__all__ = ["MaskStep", "MaskedForward", "allowed_tokens", "fill_bitmask", "plan_rows"]

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

    @property
    def guides(self) -> bool: ...  # after `check`: whether `finish` changes this step's masked logits

    def finish(self, masked: mx.array, logits: mx.array) -> mx.array: ...


class MaskStep:
    """The masks of one step's constrained rows. `fed` holds the tokens the step feeds (lazy: the previous
    step's samples), `positions[i]` the place of row i in the batch (and of its token in `fed`); `fed` is None
    for a row's first step taken alone (the prompt is fed: nothing to consume). The first to ask (`masked` or
    `apply`) computes every row's mask, as one (batch, width) matrix: rows without a grammar allow every token."""

    def __init__(self, rows: Sequence[MaskRow], fed: mx.array | None, positions: Sequence[int]) -> None:
        self._rows = list(rows)
        self._positions = list(positions)
        self._position = {id(row): i for row, i in zip(self._rows, self._positions, strict=True)}
        self._fed = fed
        self._size = fed.shape[0] if fed is not None else max(self._positions) + 1  # the batch's rows
        self._allowed: mx.array | None = None

    def masked(self, row: MaskRow, logits: mx.array) -> mx.array:
        """`row`'s logits (1, width) with -inf wherever its grammar allows no token."""
        allowed = self._allowed_tokens(logits)
        if self._size > 1:
            allowed = allowed[self._position[id(row)]]
        return row.finish(mx.where(allowed, logits, -mx.inf), logits)

    def apply(self, logits: mx.array, finishing: Sequence[MaskRow]) -> mx.array:
        """The batch's logits (batch, width), every row's mask applied in one `mx.where`. The rows in
        `finishing` are not called in this step (their processors stand aside): their `finish` is asked here,
        and only costs a row of its own once closing is near. Rows the plan does not cover (joined after a
        caller planned before the joins; the engine plans after them: batcher.constrained_step) come last and
        have no mask of this step's."""
        self._size = logits.shape[0]
        masked = mx.where(self._allowed_tokens(logits), logits, -mx.inf)
        guided = {self._position[id(row)]: row for row in finishing if row.guides}
        if not guided:
            return masked
        pieces = [masked[i:i + 1] for i in range(self._size)]
        for i, row in guided.items():
            pieces[i] = row.finish(pieces[i], logits[i:i + 1])
        return mx.concatenate(pieces, axis=0)

    def _allowed_tokens(self, logits: mx.array) -> mx.array:
        if self._allowed is None:
            self._allowed = self._compute(logits)
        return self._allowed

    def _compute(self, logits: mx.array) -> mx.array:
        """Every row's mask, computed while the forward pass runs. On a GPU, beside its launch: the tokens the
        step feeds are read first (the previous step's samples, usually on the host by now), the mask thread
        computes the masks from them, and this thread meanwhile queues the forward pass (`mx.async_eval`
        releases the GIL; on a GPU it is most of the step's host work, a launch per kernel). On the CPU, after
        it: reading the tokens before queueing the pass would keep MLX's CPU stream idle until they are
        computed, and the cores a thread would use are the model's."""
        if not beside_the_launch():
            _async_eval(logits)  # the forward pass of the whole batch (a row's logits are a slice of it)
            bitmask, plain = self._bitmask(self._fed_tokens())
        else:
            masks = _mask_thread().submit(self._bitmask, self._fed_tokens())
            try:
                _async_eval(logits)
            finally:  # should the launch fail, the matchers are not left advancing behind the caller's back
                bitmask, plain = masks.result()
        return allowed_tokens(bitmask, logits.shape[-1], plain)

    def _fed_tokens(self) -> list[int] | None:
        """The tokens the step feeds (waits for the previous step only); None for a first step."""
        return None if self._fed is None else self._fed.tolist()  # type: ignore[return-value]

    def _bitmask(self, fed: list[int] | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The step's bitmask (rows, words), and which rows have no grammar (None: every row has one). Each row's
        matcher first consumes the token the step feeds it. The mask thread: no MLX here."""
        compiler = self._rows[0].compiler
        bitmask = compiler.bitmask(self._size)
        plain: np.ndarray | None = None  # rows without a grammar, if any
        if len(self._rows) < self._size:
            plain = np.ones((self._size,), dtype=np.bool_)
            plain[self._positions] = False
            bitmask[plain] = -1  # every bit: every token
        live: list[tuple[LLMatcher, int]] = []
        for row, i in zip(self._rows, self._positions, strict=True):
            matcher = row.prepare(None if fed is None else fed[i])
            if matcher is None:
                bitmask[i] = compiler.eos_words
            else:
                live.append((matcher, i))
        fill_bitmask(live, bitmask)
        for row, i in zip(self._rows, self._positions, strict=True):
            if not row.check(bitmask[i]):
                bitmask[i] = compiler.eos_words
        return bitmask, plain


class MaskedForward:
    """The model for one generation step of a batch: called as the model, it returns logits whose last
    position has `step`'s masks applied (`MaskStep.apply`). Spent after one call: any later call is the
    model's own."""

    def __init__(self, model: Callable[..., mx.array], step: MaskStep, finishing: Sequence[MaskRow]) -> None:
        self._model = model
        self._step: MaskStep | None = step
        self._finishing = list(finishing)

    @property
    def spent(self) -> bool:
        return self._step is None

    def __call__(self, *args: object, **kwargs: object) -> mx.array:
        logits = self._model(*args, **kwargs)
        step, self._step = self._step, None
        if step is None:
            return logits
        return step.apply(logits[:, -1, :], self._finishing)[:, None, :]


def plan_rows(rows: Sequence[tuple[int, MaskRow]], fed: mx.array) -> MaskStep:
    """Plan a batch step: `rows` are (the row's place in `fed`, its processor); a processor that has not started
    (its row joins in this step, fed its prompt's last token) consumes nothing. Reading nothing yet: `fed` is
    only queued (before the forward pass that will need it)."""
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
        matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data + i * bitmask.strides[0], bitmask.shape[1] * 4)
    elif rows:
        _executor().unsafe_compute_mask_ptr(rows, bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0])


def allowed_tokens(bitmask: np.ndarray, width: int, plain: np.ndarray | None = None) -> mx.array:
    """The bitmask (rows, words) as booleans (rows, width): bit b of word w is token 32 w + b (little-endian).
    Tokens past the bitmask (the embedding's padding) are not allowed, except in the `plain` rows (a bool per
    row: a row without a grammar, its words all ones, allows every token). On a GPU the words go to the device
    as they are and are unpacked there; on the CPU numpy unpacks them faster than MLX's CPU kernels."""
    if mx.default_device().type == mx.cpu:
        return unpacked_on_host(bitmask, width, plain)
    return unpacked_on_device(bitmask, width, plain)


def unpacked_on_device(bitmask: np.ndarray, width: int, plain: np.ndarray | None = None) -> mx.array:
    """One gather, and views: each byte of the words picks its 8 booleans from a 256-entry table (each entry
    8 bytes of 0/1, read as one uint64), and the result is read as booleans. On CUDA every op is a kernel
    launch the host pays for; a gather over the batch's bytes costs the device next to nothing."""
    rows, words = bitmask.shape
    span = -(-width // 32)  # the words that cover the logits
    if span > words:  # the embedding's padding past the vocabulary: allowed only in the plain rows
        padded = np.zeros((rows, span), dtype=np.int32)
        padded[:, :words] = bitmask
        if plain is not None:
            padded[plain, words:] = -1
        bitmask = padded
    elif span < words:
        bitmask = np.ascontiguousarray(bitmask[:, :span])
    allowed = mx.view(_byte_bits()[mx.array(bitmask.view(np.uint8))], mx.bool_)  # (rows, 32 span)
    return allowed if span * 32 == width else allowed[:, :width]


def unpacked_on_host(bitmask: np.ndarray, width: int, plain: np.ndarray | None = None) -> mx.array:
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, count=width, bitorder="little")  # zeros past the words
    if plain is not None:
        bits[plain] = 1
    return mx.array(bits.view(np.bool_))


@functools.cache
def _byte_bits() -> mx.array:
    """Entry b: the 8 bits of byte b, lowest first, as 8 bytes of 0 or 1 read as one little-endian uint64."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return mx.array(bits.view(np.uint64)[:, 0])


BESIDE_THE_LAUNCH: bool | None = None  # masks computed beside the forward pass's launch; None: on a GPU


def beside_the_launch() -> bool:
    return mx.default_device().type == mx.gpu if BESIDE_THE_LAUNCH is None else BESIDE_THE_LAUNCH


@functools.cache
def _mask_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")


@functools.cache
def _executor() -> LLExecutor:
    return LLExecutor()
