"""An embeddings request -> the engine's Embed; the engine's Embedded -> OpenAI's response."""

from __future__ import annotations

import base64

import numpy as np

from gateway.embeddings import token_ids
from gateway.embeddings.wire import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from gateway.errors import invalid
from mlx_backend.contract import Embed, Embedded

MAX_INPUTS = 2048  # OpenAI's limit on one request's inputs

_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def inputs(value: str | list[object]) -> list[str]:
    """The texts to embed: strings as they are, token-id arrays decoded (gateway/embeddings/token_ids.py)."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise invalid("input", "input is an empty list; send at least one input.")
    if len(value) > MAX_INPUTS:
        raise invalid("input", f"input holds {len(value)} inputs; at most {MAX_INPUTS} per request.")
    if all(isinstance(v, str) for v in value):
        return [v for v in value if isinstance(v, str)]
    if all(_is_id(v) for v in value):
        return token_ids.decode([[v for v in value if isinstance(v, int)]])
    rows: list[list[int]] = []
    for index, row in enumerate(value):
        if not isinstance(row, list) or not all(_is_id(v) for v in row):
            raise invalid("input", f"input must be {_SHAPES}; input[{index}] is none of these.")
        if not row:
            raise invalid("input", f"input[{index}] is an empty list of token ids.")
        rows.append(row)
    return token_ids.decode(rows)


def to_embed(request: EmbeddingRequest, request_id: str) -> Embed:
    return Embed(request_id, request.model, tuple(inputs(request.input)), request.dimensions)


def response(request: EmbeddingRequest, answer: Embedded) -> EmbeddingList:
    vectors = np.frombuffer(answer.vectors, dtype="<f4").reshape(-1, answer.dimensions)
    data = [
        Embedding(index=i, embedding=base64.b64encode(v.tobytes()).decode() if request.encoding_format == "base64"
                  else v.tolist())
        for i, v in enumerate(vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=answer.prompt_tokens, total_tokens=answer.prompt_tokens)
    return EmbeddingList(data=data, model=request.model, usage=usage)
