"""Token-id input, read as what the clients that send it mean: OpenAI's cl100k_base ids.

Every OpenAI embedding model reads cl100k_base, and the clients that send token ids tokenized with it:
LangChain's `OpenAIEmbeddings`, by default, cuts each text into chunks with tiktoken and sends the chunks'
ids (cl100k_base for any model name tiktoken does not know, as a local model's), and the OpenAI cookbook does
the same. A local model's own tokenizer would read those ids as another text. So the ids are decoded to text
with tiktoken's cl100k_base, and the model tokenizes that text (usage counts the model's tokens).

tiktoken is never let download its encoding here (the gateway reaches no network): the file must be in
tiktoken's cache already, where the client's tiktoken put it on this machine (TIKTOKEN_CACHE_DIR, else
DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache), checked against tiktoken's own sha256 before it is used.
Without it, token ids are a 400 that says how to send text instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from gateway.errors import ErrorKind, GatewayError

log = logging.getLogger("mlx_gateway")

ENCODING = "cl100k_base"
# tiktoken's source of the file and its sha256 (tiktoken_ext/openai_public.py): the cache is keyed by the URL.
_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_encoding: Any = None


def cached_file() -> Path:
    """Where tiktoken keeps (or would keep) cl100k_base's file."""
    folder = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache")
    return Path(folder) / hashlib.sha1(_URL.encode()).hexdigest()


def _unavailable(why: str) -> GatewayError:
    return GatewayError(
        ErrorKind.INVALID_REQUEST,
        f"Token-id input is read as OpenAI's {ENCODING} ids and decoded to text for the model, but {why} (this "
        "server never downloads it). Send the text instead; LangChain: OpenAIEmbeddings(..., "
        f"check_embedding_ctx_length=False), or put tiktoken's {ENCODING} file in TIKTOKEN_CACHE_DIR.",
        "input",
    )


def encoding() -> Any:
    """tiktoken's cl100k_base from its cache, or GatewayError (400) naming what is missing."""
    global _encoding
    if _encoding is not None:
        return _encoding
    try:
        import tiktoken
    except ImportError:
        raise _unavailable("tiktoken is not installed") from None
    path = cached_file()
    try:
        data = path.read_bytes()
    except OSError:
        raise _unavailable(f"tiktoken's {ENCODING} file is not in its cache ({path})") from None
    if hashlib.sha256(data).hexdigest() != _SHA256:
        raise _unavailable(f"the {ENCODING} file in tiktoken's cache ({path}) is not the right one")
    _encoding = tiktoken.get_encoding(ENCODING)  # reads the cache just checked: no download
    return _encoding


def decode(rows: list[list[int]]) -> list[str]:
    """Each row of cl100k_base ids as text. A chunk boundary may cut a character: its bytes become U+FFFD."""
    enc = encoding()
    texts = []
    for index, row in enumerate(rows):
        try:
            texts.append(enc.decode_bytes(row).decode("utf-8", errors="replace"))
        except (KeyError, ValueError, OverflowError):
            raise GatewayError(ErrorKind.INVALID_REQUEST, f"input[{index}] holds token ids that {ENCODING} does "
                               f"not have (ids run from 0 to {enc.n_vocab - 1}).", "input") from None
    return texts
