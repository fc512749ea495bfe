"""OpenAI's embeddings API on the wire (CreateEmbeddingRequest, CreateEmbeddingResponse), as msgspec Structs.
Imports neither MLX nor Litestar."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType


class EmbeddingRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    # A string, a list of strings, a list of token ids or a list of token-id lists: one msgspec union cannot
    # hold several array types, so `gateway/embeddings/convert.py` tells them apart (and names what is wrong).
    input: str | list[Any]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | UnsetType = UNSET  # accepted: nothing here monitors end users


class Embedding(Struct, kw_only=True):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of the float32 little-endian values (encoding_format "base64")


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
