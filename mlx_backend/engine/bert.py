# mypy: disable-error-code="no-untyped-call, no-any-return"
# (mlx.nn has no type hints: every module's __init__ and call is "untyped")
"""A BERT encoder in MLX (bge, all-MiniLM, e5 and the like: config.json `model_type: "bert"`), its modules
named as in Hugging Face's checkpoints so their weights load as they are.

Written here rather than taken from mlx-embeddings: that package pulls in mlx-vlm, mlx-audio, datasets, opencv
and a pinned transformers for what is ~100 lines of MLX, and the engine must load every model through its own
staged, budgeted loading (mlx_backend/loading.py), which wants a lazily built module tree, not a library's
loader.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.nn.layers.activations import gelu, gelu_approx, relu
from mlx.nn.layers.base import Module
from mlx.nn.layers.embedding import Embedding
from mlx.nn.layers.linear import Linear
from mlx.nn.layers.normalization import LayerNorm


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BertConfig:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in names})


_ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu": gelu, "gelu_new": gelu_approx, "gelu_pytorch_tanh": gelu_approx, "relu": relu,
}


class BertEmbeddings(Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> mx.array:
        positions = mx.arange(input_ids.shape[1])[None]
        token_types = mx.zeros_like(input_ids)  # one segment: embeddings embed single texts
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        h = h + self.token_type_embeddings(token_types)
        return self.LayerNorm(h)


class BertSelfAttention(Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = Linear(config.hidden_size, config.hidden_size)
        self.key = Linear(config.hidden_size, config.hidden_size)
        self.value = Linear(config.hidden_size, config.hidden_size)


class BertSelfOutput(Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class BertAttention(Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        setattr(self, "self", BertSelfAttention(config))  # noqa: B010 (the checkpoint's name for it)
        self.output = BertSelfOutput(config)

    def __call__(self, h: mx.array, mask: mx.array) -> mx.array:
        attention: BertSelfAttention = getattr(self, "self")  # noqa: B009
        batch, length, width = h.shape
        heads = attention.heads

        def split(x: mx.array) -> mx.array:
            return x.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)

        q, k, v = split(attention.query(h)), split(attention.key(h)), split(attention.value(h))
        context = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(width // heads), mask=mask)
        context = context.transpose(0, 2, 1, 3).reshape(batch, length, width)
        return self.output.LayerNorm(self.output.dense(context) + h)


class BertIntermediate(Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)


class BertOutput(Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class BertLayer(Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self._act = _ACTIVATIONS.get(config.hidden_act, gelu)

    def __call__(self, h: mx.array, mask: mx.array) -> mx.array:
        h = self.attention(h, mask)
        return self.output.LayerNorm(self.output.dense(self._act(self.intermediate.dense(h))) + h)


class BertEncoder(Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = [BertLayer(config) for _ in range(config.num_hidden_layers)]


class BertModel(Module):
    """input_ids and attention_mask (batch, length; 1 for tokens, 0 for padding) -> the last hidden states."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        h = self.embeddings(input_ids)
        # Padding is never attended to: an additive mask, (batch, 1, 1, length), in the activations' dtype.
        mask = ((1 - attention_mask[:, None, None, :]) * -1e9).astype(h.dtype)
        for layer in self.encoder.layer:
            h = layer(h, mask)
        return h

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names -> this module's: a task model's `bert.` prefix goes, old `gamma`/`beta` names
        become `weight`/`bias`; the pooler, task heads and buffers (position_ids) are not used."""
        kept: dict[str, mx.array] = {}
        for name, value in weights.items():
            name = name.removeprefix("bert.").removeprefix("model.")
            if not name.startswith(("embeddings.", "encoder.")) or name.endswith("position_ids"):
                continue
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            kept[name] = value
        return kept
