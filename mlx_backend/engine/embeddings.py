"""Embeddings on the MLX thread: embedding models built for the staged load, inputs batched into padded,
attention-masked forward passes, pooled and normalised; and the Embed commands waiting for their model.

An Embed is served like a generation request as far as residency goes: its model is acquired through residency
(mlx_backend/engine/residency/: loaded in pieces, within the memory budget, kept alive, pinned, evicted like
any), `Loading` tells the gateway a load runs for it. Once its model is there it runs at once, in one loop pass,
with the other requests for that model ready in the same pass: inputs sorted by length, cut into padded passes
sized like prefill pieces (mlx_backend/engine/pacing.py), each one moving the progress counter the gateway's
stall clock watches. (Other models' decoding waits for that loop pass: a known cost of a very large request.)

Encoders (mlx_backend/engine/bert.py) see an attention mask; a decoder (Qwen3-Embedding, through mlx-lm's model) is
right-padded: its attention is causal, so a real token never sees the padding after it, and the last real
token's state is exactly that of the input alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from mlx.nn.layers.base import Module

from mlx_backend.contract import Embed, Embedded, Event, Failed, Loading, Started
from mlx_backend.embedding_spec import SERVED_ENCODERS, EmbeddingSpec, read_spec
from mlx_backend.engine.bert import BertConfig, BertModel
from mlx_backend.engine.pacing import PrefillPacer
from mlx_backend.errors import EngineError, EngineErrorCode

if TYPE_CHECKING:
    from mlx_backend.engine.residency.models import CachedModel
    from mlx_backend.engine.residency.residency import Residency

log = logging.getLogger("mlx_gateway.engine.embeddings")

MAX_BATCH_TOKENS = 16384  # padded tokens in one forward pass: bounds the activations (and a pass's time)
MAX_BATCH_ROWS = 256


# -- loading (called by model_check.py and model_load.py for embedding models) ---------------------------


def supported(spec: EmbeddingSpec) -> str | None:
    """Why this embedding model cannot be served here, or None."""
    if spec.family == "encoder" and spec.model_type not in SERVED_ENCODERS:
        return f"model_type '{spec.model_type[:80]}' is an encoder this server does not implement (BERT is)."
    return None


def load_model(path: Path, lazy: bool = True) -> tuple[Any, dict[str, Any]]:
    """The model's module tree with its weights (lazy arrays: the staged load evaluates them piece by piece)."""
    from mlx_lm.utils import load_config

    config = load_config(path)
    spec = read_spec(path, config)
    assert spec is not None, "load_model is for embedding models"
    weights: dict[str, mx.array] = {}
    for file in sorted(path.glob("model*.safetensors")):
        weights.update(mx.load(str(file)))  # type: ignore[arg-type]
    model: Any
    if spec.family == "encoder":
        model = BertModel(BertConfig.from_dict(config))
        model.load_weights(list(BertModel.sanitize(weights).items()), strict=True)
    else:
        model = _decoder(config, weights)
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def _decoder(config: dict[str, Any], weights: dict[str, mx.array]) -> Module:
    """mlx-lm's model of the family, without its head (never used): sentence-transformers checkpoints hold the
    bare decoder (`layers.0...`), mlx conversions the whole model (`model.layers.0...`); both load."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config=config)
    args = args_class.from_dict({**config, "tie_word_embeddings": True})  # no lm_head module to fill
    model = model_class(args)
    weights = {k if k.startswith("model.") else f"model.{k}": v for k, v in weights.items()
               if not k.startswith("lm_head.")}
    model.load_weights(list(weights.items()), strict=True)
    return model  # type: ignore[no-any-return]


# -- computing --------------------------------------------------------------------------------------------


def hidden_size(config: dict[str, Any]) -> int:
    return int(config.get("hidden_size") or config.get("d_model") or 0)


def check_dimensions(spec: EmbeddingSpec, model_id: str, native: int, dimensions: int | None) -> int:
    """The vector length to return; raises INVALID_REQUEST (param `dimensions`) for one the model cannot give."""
    if dimensions is None or dimensions == native:
        return native
    if dimensions > native:
        raise EngineError(EngineErrorCode.INVALID_REQUEST, f"dimensions is {dimensions}, but the model "
                          f"'{model_id}' makes vectors of {native} dimensions.", "dimensions")
    if not spec.matryoshka:
        raise EngineError(EngineErrorCode.INVALID_REQUEST, f"The model '{model_id}' was not trained for "
                          f"shortened vectors (Matryoshka), so dimensions must be left out or be {native}.",
                          "dimensions")
    return dimensions


def tokenize(tokenizer: Any, texts: tuple[str, ...], context: int | None, model_id: str) -> list[list[int]]:
    """Each input's tokens, the model's special tokens included (BERT's [CLS] ... [SEP], Qwen3-Embedding's
    closing <|endoftext|>). Raises CONTEXT_LENGTH_EXCEEDED naming the first input that does not fit."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the transformers tokenizer
    ids: list[list[int]] = [list(map(int, row)) for row in hf(list(texts), add_special_tokens=True)["input_ids"]]
    for index, row in enumerate(ids):
        if context is not None and len(row) > context:
            raise EngineError(EngineErrorCode.CONTEXT_LENGTH_EXCEEDED, f"input[{index}] is {len(row)} tokens; the "
                              f"model '{model_id}' reads at most {context}. Shorten or split it.", "input")
        if not row:
            raise EngineError(EngineErrorCode.INVALID_REQUEST, f"input[{index}] has no tokens for the model "
                              f"'{model_id}'.", "input")
    return ids


def _take(order: list[int], lengths: list[int], max_tokens: int, max_rows: int) -> tuple[list[int], bool]:
    """The next pass: inputs from the front of `order` (sorted by length) while the pass stays within
    `max_tokens` padded tokens and `max_rows` rows (an input longer than max_tokens passes alone); and whether
    the bound cut it short (a full pass)."""
    group = [order.pop(0)]
    while order and len(group) < max_rows and (len(group) + 1) * lengths[order[0]] <= max_tokens:
        group.append(order.pop(0))
    return group, bool(order)


def batches(lengths: list[int], max_tokens: int = MAX_BATCH_TOKENS, max_rows: int = MAX_BATCH_ROWS) -> list[list[int]]:
    """Input indices grouped into passes, shortest first (little padding), within the bounds of `_take`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups = []
    while order:
        groups.append(_take(order, lengths, max_tokens, max_rows)[0])
    return groups


def pool(hidden: mx.array, mask: mx.array, lengths: mx.array, pooling: str) -> mx.array:
    """(batch, length, width) hidden states -> (batch, width): the first token's, the mean of the real
    tokens', or the last real token's."""
    hidden = hidden.astype(mx.float32)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        return hidden[mx.arange(hidden.shape[0]), lengths - 1]
    weights = mask.astype(mx.float32)[..., None]
    return (hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1.0)


def finish(pooled: mx.array, dimensions: int, normalize: bool) -> mx.array:
    """Truncated to `dimensions` (Matryoshka), then scaled to unit length when the model normalises."""
    vectors = pooled[:, :dimensions]
    if normalize:
        vectors = vectors / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return vectors


def forward(model: Module, spec: EmbeddingSpec, rows: list[list[int]]) -> tuple[mx.array, mx.array, mx.array]:
    """One padded pass: the hidden states, the attention mask and each row's length."""
    width = max(len(r) for r in rows)
    ids = mx.array([r + [0] * (width - len(r)) for r in rows], dtype=mx.int32)
    mask = mx.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=mx.int32)
    lengths = mx.array([len(r) for r in rows], dtype=mx.int32)
    # A decoder's attention is causal: the padding on the right is never seen.
    hidden = model(ids, mask) if spec.family == "encoder" else model.model(ids)
    return hidden, mask, lengths


def embed(model: Module, spec: EmbeddingSpec, ids: list[list[int]], dimensions: int,
          progress: Callable[[], None] = lambda: None,
          pacer: PrefillPacer | None = None) -> np.ndarray[Any, np.dtype[np.float32]]:
    """(inputs, dimensions) float32 vectors, in input order. `pacer` (the model's) sizes each pass to take about
    its piece time on this device, as prefill pieces are (mlx_backend/engine/pacing.py): every pass moves the stall
    clock's counter, so a large request on a busy CPU is never taken for a stalled engine. A decoder's input
    longer than a pass is run in pieces through a KV cache, as a prompt's prefill is; an encoder's cannot be
    (its attention sees the whole input), so it passes whole."""
    out = np.empty((len(ids), dimensions), dtype=np.float32)
    lengths = [len(r) for r in ids]
    order = sorted(range(len(ids)), key=lambda i: lengths[i])
    while order:
        budget = pacer.size if pacer is not None else MAX_BATCH_TOKENS
        group, full = _take(order, lengths, budget, MAX_BATCH_ROWS)
        started = time.monotonic()
        if spec.family == "decoder" and lengths[group[0]] > budget:
            vectors = finish(_last_state_in_pieces(model, ids[group[0]], budget, progress), dimensions,
                             spec.normalize)
        else:
            hidden, mask, lengths_in_pass = forward(model, spec, [ids[i] for i in group])
            vectors = finish(pool(hidden, mask, lengths_in_pass, spec.pooling), dimensions, spec.normalize)
        mx.eval(vectors)
        out[group] = np.array(vectors, copy=False)
        if pacer is not None:
            padded, took = len(group) * max(lengths[i] for i in group), time.monotonic() - started
            # A pass the budget cut short speaks for the whole budget (its time scaled up to it).
            if full and padded < budget:
                pacer.observe(budget, took * budget / padded)
            else:
                pacer.observe(padded, took)
        progress()
    return out


def _last_state_in_pieces(model: Module, row: list[int], piece: int, progress: Callable[[], None]) -> mx.array:
    """A decoder's last hidden state for one long input, computed `piece` tokens at a time through a KV cache
    (the causal mask offset by what the cache holds, as mlx-lm's prefill runs): (1, width)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    hidden: mx.array | None = None
    for start in range(0, len(row), piece):
        hidden = model.model(mx.array([row[start:start + piece]]), cache=cache)
        mx.eval(hidden)
        progress()
    assert hidden is not None
    return hidden[:, -1].astype(mx.float32)


# -- the Embed commands (MLX thread) --------------------------------------------------------------------


class EmbedRequests:
    """Embed commands waiting for their model, answered in the loop pass their model is there."""

    def __init__(self, residency: Residency, emit: Callable[[Event], None], progress: Callable[[], None],
                 piece_s: float = 1.0) -> None:
        self.cache = residency
        self.piece_s = piece_s  # a pass should take about this long (EngineConfig.prefill_piece_s; 0: fixed)
        self._pacers: dict[str, PrefillPacer] = {}  # per model: how many padded tokens make a pass
        self._emit = emit
        self._progress = progress
        self._waiting: dict[str, Embed] = {}
        self._announced: set[str] = set()  # told Loading already

    def __len__(self) -> int:
        return len(self._waiting)

    def ready(self) -> bool:
        """Whether a waiting request can run now (its model is not loading): the loop must not sleep."""
        return any(not self.cache.is_loading(c.model) for c in self._waiting.values())

    def submit(self, command: Embed) -> None:
        if command.request_id in self._waiting:
            self._emit(Failed(command.request_id, EngineErrorCode.INTERNAL.value, "Duplicate request id."))
            return
        self._waiting[command.request_id] = command

    def abort(self, request_id: str) -> bool:
        """False: not one of ours (or already answered)."""
        if self._waiting.pop(request_id, None) is None:
            return False
        self._announced.discard(request_id)
        self.cache.forget_waiter(request_id)
        self._emit(Failed(request_id, EngineErrorCode.INVALID_REQUEST.value, "Aborted."))
        return True

    def step(self, busy: Collection[str]) -> None:
        """Answer every waiting request whose model is loaded (asking for the load of the others). Requests for
        one model that are ready in the same pass share its forward passes: many clients of one query each are
        batched as one request of many inputs would be."""
        ready: dict[tuple[str, int], list[_Prepared]] = {}
        for command in list(self._waiting.values()):
            rid = command.request_id
            try:
                cached = self.cache.acquire(command.model, busy, waiter=rid)
                if cached is None:
                    if rid not in self._announced:
                        self._announced.add(rid)
                        self._emit(Loading(rid, command.model))
                    continue
                prepared = _prepare(command, cached)
            except EngineError as exc:
                self._answer(command, Failed(rid, exc.code.value, exc.message, exc.param))
                continue
            except Exception as exc:
                log.exception("embedding request %s failed", rid)
                self._answer(command, Failed(rid, EngineErrorCode.INTERNAL.value,
                                             f"Embedding failed: {type(exc).__name__}"))
                continue
            self._emit(Started(rid, prepared.tokens, 0))
            ready.setdefault((command.model, prepared.dimensions), []).append(prepared)
        for group in ready.values():
            self._run(group)

    def _run(self, group: list[_Prepared]) -> None:
        """One model's ready requests (asking for one vector length): their inputs in shared passes."""
        first = group[0]
        model_id = first.command.model
        pacer = self._pacers.get(model_id)
        if pacer is None:
            pacer = self._pacers[model_id] = PrefillPacer(MAX_BATCH_TOKENS, self.piece_s)
        try:
            vectors = embed(first.cached.artifacts.model, first.spec, [row for p in group for row in p.ids],
                            first.dimensions, self._progress, pacer)
        except Exception as exc:
            log.exception("embedding %d request(s) of %s failed", len(group), first.command.model)
            for p in group:
                self._answer(p.command, Failed(p.command.request_id, EngineErrorCode.INTERNAL.value,
                                               f"Embedding failed: {type(exc).__name__}"))
            return
        start = 0
        for p in group:
            mine = vectors[start:start + len(p.ids)]
            start += len(p.ids)
            self._answer(p.command, Embedded(p.command.request_id, mine.astype("<f4").tobytes(), p.dimensions,
                                             p.tokens))

    def _answer(self, command: Embed, answer: Embedded | Failed) -> None:
        rid = command.request_id
        del self._waiting[rid]
        self._announced.discard(rid)
        self.cache.forget_waiter(rid)
        self.cache.request_done(rid, command.model)  # its keep-alive counts from now
        self._emit(answer)


@dataclass
class _Prepared:
    """An Embed whose model is loaded: its inputs tokenized, its vector length checked."""

    command: Embed
    cached: CachedModel
    spec: EmbeddingSpec
    dimensions: int
    ids: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.ids)


def _prepare(command: Embed, cached: CachedModel) -> _Prepared:
    spec = read_spec(cached.entry.path, cached.artifacts.config)
    if spec is None:
        raise EngineError(EngineErrorCode.INVALID_REQUEST, f"The model '{command.model}' is a chat model, not an "
                          "embedding model; it serves /v1/chat/completions, not /v1/embeddings.", "model")
    dimensions = check_dimensions(spec, command.model, hidden_size(cached.artifacts.config), command.dimensions)
    ids = tokenize(cached.artifacts.tokenizer, command.inputs, cached.artifacts.context_length, command.model)
    return _Prepared(command, cached, spec, dimensions, ids)
