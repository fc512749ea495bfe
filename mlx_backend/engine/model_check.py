"""Check a model folder by hand, cheaply (headers only), before anything heavy; and what every way of
loading it shares: the failure's wording, the dtype weights are held in, mlx-lm's loading functions.

Every failure is an EngineError naming the model and the cause: a broken folder must give the user a
readable reason, never a stack trace, and must never take the engine down.
"""

from __future__ import annotations

import os

# Never reach a hub: a folder that vanished must not turn into a download. Set before transformers or
# huggingface_hub are imported (mlx_lm imports both).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import functools
import importlib.util
import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.nn.layers.base import Module
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import MODEL_ARCHITECTURE_REMAPPING, MODEL_REMAPPING

# Re-exported (imported here, after the hub is switched off): mlx_backend.engine.model_load calls them
# through this module, where tests replace them.
from mlx_lm.utils import load_config as load_config
from mlx_lm.utils import load_model as load_model
from mlx_lm.utils import load_tokenizer as load_tokenizer

from mlx_backend.embedding_spec import read_spec
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelEntry

log = logging.getLogger("mlx_gateway.engine.loader")

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
_TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
_TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_MESSAGE_LIMIT = 600


@dataclass(frozen=True)
class LoadedArtifacts:
    model: Module
    tokenizer: TokenizerWrapper
    config: dict[str, Any]
    size_bytes: int  # tensor bytes held in memory: the safetensors headers' sizes, float16 doubled on the CPU
    context_length: int | None
    float16_upcast: bool = False  # float16 parameters are held and computed in float32 (`upcast_float16`)
    processor: Any = None  # a vision model's image processor (mlx-vlm's; mlx_backend/engine/vision.py); None: text only


def load_failure(
    entry: ModelEntry, cause: str, code: EngineErrorCode = EngineErrorCode.MODEL_LOAD_FAILED
) -> EngineError:
    message = f"The model '{entry.id}' cannot be loaded: {cause}"
    if len(message) > _MESSAGE_LIMIT:
        message = message[: _MESSAGE_LIMIT - 3] + "..."
    return EngineError(code, message)


# -- the dtype weights are computed in -----------------------------------------------------------------
# On the CPU, float16 parameters are held and computed in float32: MLX's CPU kernels decode float16 about half as
# fast as float32 (tests/benchmarks/bench_cpu_dtype.py; the demo model 94 vs 192 tokens per CPU second, the
# smollm2-135m shape likewise, see docs/benchmarks.md), and float16 -> float32 is exact. bfloat16 decodes near
# float32's speed at half the memory and stays as it is. A GPU keeps the checkpoint's dtypes. The memory ledger
# counts what is held: float16 tensors at twice their file size, and the KV cache in float32
# (mlx_backend/engine/residency/memory.py, kv_bytes_per_token).


def upcasts_float16() -> bool:
    """Whether this engine's device holds float16 weights as float32 (the CPU)."""
    return bool(mx.default_device() == mx.cpu)


def upcast_float16(model: Module) -> None:
    """Make the model's float16 parameters float32, lazily: each is cast as it is first evaluated, so a staged
    load still reads one tensor at a time."""
    model.set_dtype(mx.float32, predicate=lambda dtype: dtype == mx.float16)


# -- validation (no MLX work) ------------------------------------------------------------------------


def validate(entry: ModelEntry) -> int:
    """Check config, architecture, weights and tokenizer files; return the bytes the weights will hold in
    memory on this engine's device (float16 tensors twice their size where `upcasts_float16`)."""
    config = _read_config(entry)
    _check_architecture(entry, config)
    upcast = upcasts_float16()
    size = sum(_tensor_bytes(entry, f, upcast) for f in weight_files(entry))
    _check_tokenizer(entry)
    return size


def _read_json(entry: ModelEntry, name: str) -> object:
    try:
        with open(entry.path / name, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise load_failure(entry, f"{name} is missing.") from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or absurdly nested
        raise load_failure(entry, f"{name} is not valid JSON ({describe_exception(exc)}).") from None
    except OSError as exc:
        raise load_failure(entry, f"{name} cannot be read ({exc.strerror or exc}).") from None


def _read_config(entry: ModelEntry) -> dict[str, Any]:
    config = _read_json(entry, "config.json")
    if not isinstance(config, dict):
        raise load_failure(entry, "config.json is not a JSON object.")
    return config


@functools.cache
def vision_available() -> bool:
    """Whether mlx-vlm (the optional extra) is installed, found without importing it."""
    return importlib.util.find_spec("mlx_vlm") is not None


def _check_vision_architecture(entry: ModelEntry, model_type: str) -> None:
    """A vision model is served by mlx-vlm (mlx_backend/engine/vision.py): it must have code for this model_type."""
    spec = importlib.util.find_spec("mlx_vlm")
    roots = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not roots or not model_type.isidentifier() or not (Path(roots[0]) / "models" / model_type).is_dir():
        raise load_failure(entry, f"model_type '{model_type[:80]}' is not supported by this mlx-vlm.",
                    EngineErrorCode.MODEL_UNSUPPORTED)


def _check_architecture(entry: ModelEntry, config: dict[str, Any]) -> None:
    unsupported = EngineErrorCode.MODEL_UNSUPPORTED
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise load_failure(entry, "config.json has no model_type.", unsupported)
    if config.get("model_file") is not None:
        raise load_failure(entry, "it needs custom model code (model_file), which is never run here.", unsupported)
    spec = read_spec(entry.path, config)
    if spec is not None and spec.family == "encoder":  # an embedding encoder: ours, not mlx-lm's
        from mlx_backend.engine.embeddings import supported

        if (reason := supported(spec)) is not None:
            raise load_failure(entry, reason, unsupported)
        return
    if entry.vision and vision_available():
        _check_vision_architecture(entry, model_type)
        return
    # The same remapping mlx-lm applies, so aliases such as "mistral" -> "llama" pass.
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    module = next(
        (MODEL_ARCHITECTURE_REMAPPING[(model_type, a)] for a in architectures
         if isinstance(a, str) and (model_type, a) in MODEL_ARCHITECTURE_REMAPPING),
        MODEL_REMAPPING.get(model_type, model_type),
    )
    found = False
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module):
        try:
            found = importlib.util.find_spec(f"mlx_lm.models.{module}") is not None
        except (ImportError, ValueError):
            found = False
    if not found:
        raise load_failure(entry, f"model_type '{model_type[:80]}' is not supported by this mlx-lm.", unsupported)


def weight_files(entry: ModelEntry) -> list[Path]:
    """The files mlx-lm will read (model*.safetensors); every shard an index names must be there."""
    try:
        files = sorted(p for p in entry.path.glob("model*.safetensors"))
    except OSError as exc:
        raise load_failure(entry, f"its folder cannot be read ({exc.strerror or exc}).") from None
    if not files:
        raise load_failure(entry, "no weights (model*.safetensors) in its folder.")
    if (entry.path / "model.safetensors.index.json").exists():
        index = _read_json(entry, "model.safetensors.index.json")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if isinstance(weight_map, dict):
            names = {p.name for p in files}
            missing = sorted({str(v) for v in weight_map.values()} - names)
            if missing:
                raise load_failure(entry, f"weight shard {missing[0]} is missing ({len(missing)} shards missing).")
    return files


def _tensor_bytes(entry: ModelEntry, path: Path, upcast: bool = False) -> int:
    """Parse a safetensors header by hand (8-byte little-endian length + JSON); return its tensor bytes."""
    name = path.name
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise load_failure(entry, f"{name} is truncated ({file_size} bytes, no header).")
            (header_len,) = struct.unpack("<Q", head)
            if header_len < 2 or header_len > MAX_HEADER_BYTES:
                raise load_failure(entry, f"{name} has a corrupt header (header length {header_len}).")
            if 8 + header_len > file_size:
                raise load_failure(entry, f"{name} is truncated (its header needs {header_len} bytes, "
                                   f"the file has {file_size}).")
            raw = f.read(header_len)
    except OSError as exc:
        raise load_failure(entry, f"{name} cannot be read ({exc.strerror or exc}).") from None
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" \0"))
    except (ValueError, RecursionError):
        raise load_failure(entry, f"{name} has a corrupt header (not JSON).") from None
    if not isinstance(header, dict):
        raise load_failure(entry, f"{name} has a corrupt header (not a JSON object).")
    data_size = file_size - 8 - header_len
    total = 0
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        size = _check_tensor(entry, name, tensor, info, data_size)
        total += 2 * size if upcast and isinstance(info, dict) and info.get("dtype") == "F16" else size
    return total


def _check_tensor(entry: ModelEntry, name: str, tensor: str, info: object, data_size: int) -> int:
    bad = load_failure(entry, f"{name} has a corrupt header (tensor '{tensor[:80]}').")
    if not isinstance(info, dict):
        raise bad
    offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)) or not isinstance(dtype, str):
        raise bad
    begin, end = offsets
    if begin > end:
        raise bad
    if end > data_size:
        raise load_failure(entry, f"{name} is truncated (tensor '{tensor[:80]}' ends at byte {end} of the data, "
                           f"the file holds {data_size}).")
    width = _DTYPE_BYTES.get(dtype)
    if width is not None and math.prod(shape) * width != end - begin:
        raise load_failure(entry, f"{name} has a corrupt header (tensor '{tensor[:80]}' does not fit its shape).")
    return int(end - begin)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tokenizer(entry: ModelEntry) -> None:
    try:
        present = set(os.listdir(entry.path))
    except OSError as exc:
        raise load_failure(entry, f"its folder cannot be read ({exc.strerror or exc}).") from None
    if not any(n in _TOKENIZER_MAIN_FILES or n.endswith(".tiktoken") for n in present):
        raise load_failure(entry, "its tokenizer is missing (no tokenizer.json, tokenizer.model or vocab.json).")
    for name in _TOKENIZER_JSON_FILES:
        if name in present and not isinstance(_read_json(entry, name), dict):
            raise load_failure(entry, f"{name} is not a JSON object.")


def describe_exception(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
