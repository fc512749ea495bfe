"""Whether a model folder holds an embedding model, and how its vectors are made. No MLX: the registry (gateway
process) imports this to tell embedding models from chat models.

An embedding model is either an encoder (config.json's model_type or architecture is BERT-family: bge,
all-MiniLM, e5...) or a checkpoint laid out for sentence-transformers (`modules.json`), such as
Qwen3-Embedding, a decoder whose last token's hidden state is the vector. sentence-transformers' files say how
to pool (`1_Pooling/config.json`: CLS, mean or last token) and whether to normalise (a `Normalize` module);
without them, encoders pool the mean, decoders the last token, and vectors are normalised (as OpenAI's are).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Pooling = Literal["cls", "mean", "last"]
Family = Literal["encoder", "decoder"]

# Encoders: the family served (mlx_backend/engine/bert.py), and others known to be encoders, so that a chat request to
# one is refused by name and loading one says the architecture is not supported (rather than "not found").
SERVED_ENCODERS = frozenset({"bert"})
ENCODER_MODEL_TYPES = SERVED_ENCODERS | {
    "roberta", "xlm-roberta", "nomic_bert", "modernbert", "distilbert", "mpnet", "electra", "deberta-v2",
}
# Decoder embedding models trained for Matryoshka truncation (Qwen3-Embedding: any size from 32 up).
MATRYOSHKA_DECODERS = frozenset({"qwen3"})
_POOLING_KEYS: tuple[tuple[str, Pooling], ...] = (
    ("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"), ("pooling_mode_mean_tokens", "mean"),
)


@dataclass(frozen=True)
class EmbeddingSpec:
    family: Family
    model_type: str
    pooling: Pooling
    normalize: bool
    matryoshka: bool  # trained so that the first k dimensions are an embedding too (`dimensions` truncates)


def _json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def _is_encoder(config: dict[str, Any]) -> bool:
    model_type = config.get("model_type")
    architectures = config.get("architectures")
    names = [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else []
    return model_type in ENCODER_MODEL_TYPES or any(
        a.endswith(("BertModel", "RobertaModel", "ForMaskedLM")) for a in names
    )


def read_spec(folder: Path, config: dict[str, Any] | None = None) -> EmbeddingSpec | None:
    """The folder's embedding spec, or None for a generative (chat) model. `config`: config.json, if read."""
    if config is None:
        config = _json(folder / "config.json")
    if not isinstance(config, dict):
        return None
    modules = _json(folder / "modules.json")
    modules = [m for m in modules if isinstance(m, dict)] if isinstance(modules, list) else None
    encoder = _is_encoder(config)
    if not encoder and not modules:
        return None
    family: Family = "encoder" if encoder else "decoder"
    model_type = str(config.get("model_type") or "")
    pooling: Pooling = "mean" if encoder else "last"
    normalize = True
    if modules:
        kinds = [str(m.get("type", "")) for m in modules]
        normalize = any(k.endswith(".Normalize") for k in kinds)
        pool_dir = next((str(m.get("path") or "") for m in modules if str(m.get("type", "")).endswith(".Pooling")),
                        "1_Pooling")
        pool = _json(folder / pool_dir / "config.json") if pool_dir and ".." not in pool_dir else None
        if isinstance(pool, dict):
            pooling = next((mode for key, mode in _POOLING_KEYS if pool.get(key) is True), pooling)
    matryoshka = family == "decoder" and pooling == "last" and model_type in MATRYOSHKA_DECODERS
    return EmbeddingSpec(family, model_type, pooling, normalize, matryoshka)


def is_embedding_model(folder: Path) -> bool:
    return read_spec(folder) is not None
