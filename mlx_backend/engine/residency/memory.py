"""What holds the engine's memory budget, in bytes: model weights, the load in progress, the running requests'
KV cache, and the prefix cache. No MLX here: plain accounting, so the rules are unit-tested on numbers.

The KV cache is reserved when a request is admitted, for its whole possible length (prompt + max_tokens),
so a batch never grows past what was admitted. mlx-lm's batch cache is one rectangular array per layer
(rows x longest row, left-padded, grown in steps of 256 tokens), so a model's reservation is its row count
times its longest row, not the sum of the rows: one long request in a batch of short ones costs every row
the long length, and the ledger says so.

The prefix cache is the ledger's to trim: it is only a cache, the first thing given up when weights or a KV
cache need room (mlx_backend/engine/residency/prefix.py holds it; the ledger sees its bytes and can trim it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

KV_STEP_TOKENS = 256  # mlx-lm's KVCache / BatchKVCache grow their arrays in steps of this many tokens
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def kv_bytes_per_token(config: Mapping[str, Any], float16_upcast: bool = False) -> int:
    """Bytes of KV cache one token costs one row: 2 (keys, values) x layers x KV heads x head dim x dtype width.

    From config.json's usual names (a `text_config` for multimodal checkpoints); the activations' dtype is the
    checkpoint's `torch_dtype` (quantized checkpoints keep their scales' float type there), float32 where float16
    weights are held as float32 (`float16_upcast`, the CPU: mlx_backend/engine/model_check.py). 0 when the config
    does not say enough: such a model's KV cache is then not budgeted (the engine logs it)."""
    scope: Mapping[str, Any] = config
    text = config.get("text_config")
    if isinstance(text, Mapping) and not _count(config, "num_hidden_layers", "n_layer", "num_layers"):
        scope = text
    layers = _count(scope, "num_hidden_layers", "n_layer", "num_layers")
    heads = _count(scope, "num_attention_heads", "n_head")
    kv_heads = _count(scope, "num_key_value_heads", "n_kv_heads", "multi_query_group_num") or heads
    head_dim = _count(scope, "head_dim")
    if not head_dim and heads:
        head_dim = _count(scope, "hidden_size", "n_embd", "d_model") // heads
    if not (layers and kv_heads and head_dim):
        return 0
    dtype = scope.get("torch_dtype") or scope.get("dtype") or config.get("torch_dtype") or "float16"
    name = str(dtype).removeprefix("torch.")
    width = 4 if float16_upcast and name == "float16" else _DTYPE_BYTES.get(name, 2)
    return 2 * layers * kv_heads * head_dim * width


def _count(scope: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        value = scope.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def rounded_tokens(tokens: int) -> int:
    """Tokens a cache of `tokens` really allocates (whole steps)."""
    return max(1, math.ceil(tokens / KV_STEP_TOKENS)) * KV_STEP_TOKENS


def batch_kv_bytes(row_tokens: list[int] | tuple[int, ...], per_token: int) -> int:
    """The KV bytes of a batch whose rows may reach these lengths: rows x the longest, in whole steps."""
    if not row_tokens:
        return 0
    return len(row_tokens) * rounded_tokens(max(row_tokens)) * per_token


def _rows_of(reserved: dict[str, tuple[int, int]]) -> list[int]:
    return [tokens for tokens, rows in reserved.values() for _ in range(rows)]


class PrefixCache(Protocol):
    """The prefix cache as the budget sees it: what it holds, and a way to give some of it back."""

    @property
    def nbytes(self) -> int: ...
    def trim(self, n_bytes: int) -> None: ...
    def drop(self, model_id: str) -> None: ...


class NoPrefixCache:
    """No prefix cache (an engine group's ranks, tests of the rules): it holds nothing."""

    nbytes = 0

    def trim(self, n_bytes: int) -> None:
        return None

    def drop(self, model_id: str) -> None:
        return None


class MemoryLedger:
    """Who holds the budget. Used by the MLX thread; the heartbeat thread reads the totals (plain ints)."""

    def __init__(self, budget: int, prefix: PrefixCache | None = None) -> None:
        self.budget = budget
        self.prefix: PrefixCache = prefix if prefix is not None else NoPrefixCache()
        self.weights: dict[str, int] = {}  # loaded model id -> bytes
        self.loading = 0  # bytes reserved for the load in progress
        self._per_token: dict[str, int] = {}  # model id -> KV bytes per token and row
        self._rows: dict[str, dict[str, tuple[int, int]]] = {}  # model id -> request id -> (tokens, rows)
        self._model_of: dict[str, str] = {}  # request id -> model id

    # -- weights ---------------------------------------------------------------------------------------

    def add_model(self, model_id: str, size: int, per_token: int) -> None:
        self.weights[model_id] = size
        self._per_token[model_id] = per_token

    def remove_model(self, model_id: str) -> None:
        self.weights.pop(model_id, None)
        self._per_token.pop(model_id, None)

    # -- KV cache --------------------------------------------------------------------------------------

    def per_token(self, model_id: str) -> int:
        return self._per_token.get(model_id, 0)

    def kv_bytes(self, model_id: str | None = None) -> int:
        """Reserved KV bytes of one model's batch, or of every model's."""
        models = [model_id] if model_id is not None else list(self._rows)
        return sum(batch_kv_bytes(_rows_of(self._rows.get(m, {})), self.per_token(m)) for m in models)

    def kv_increase(self, model_id: str, tokens: int, rows: int = 1) -> int:
        """How many more bytes the model's batch holds once `rows` rows of `tokens` join it."""
        current = _rows_of(self._rows.get(model_id, {}))
        per_token = self.per_token(model_id)
        return batch_kv_bytes([*current, *[tokens] * rows], per_token) - batch_kv_bytes(current, per_token)

    def alone_bytes(self, model_id: str, tokens: int, rows: int = 1) -> int:
        """What the request needs with its model and nothing else: the weights and its own rows."""
        return self.weights.get(model_id, 0) + batch_kv_bytes([tokens] * rows, self.per_token(model_id))

    def reserve(self, request_id: str, model_id: str, tokens: int, rows: int = 1) -> None:
        self._rows.setdefault(model_id, {})[request_id] = (tokens, rows)
        self._model_of[request_id] = model_id

    def release(self, request_id: str) -> None:
        model_id = self._model_of.pop(request_id, None)
        if model_id is None:
            return
        rows = self._rows.get(model_id, {})
        rows.pop(request_id, None)
        if not rows:
            self._rows.pop(model_id, None)

    def rows(self, model_id: str) -> int:
        return len(_rows_of(self._rows.get(model_id, {})))

    # -- the prefix cache -----------------------------------------------------------------------------------

    @property
    def prefix_bytes(self) -> int:
        return self.prefix.nbytes

    def trim_prefix(self, n_bytes: int) -> None:
        """Give back about `n_bytes` of prefix cache (weights or a KV cache need them)."""
        self.prefix.trim(n_bytes)

    def drop_prefix(self, model_id: str) -> None:
        """A model goes: its prefix cache goes with it."""
        self.prefix.drop(model_id)

    # -- totals ----------------------------------------------------------------------------------------

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def used(self) -> int:
        return self.weights_bytes + self.loading + self.kv_bytes() + self.prefix_bytes

    @property
    def free(self) -> int:
        return self.budget - self.used
