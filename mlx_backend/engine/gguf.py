"""A Llama-architecture GGUF file (llama.cpp's format) -> an mlx-lm model folder.

MLX reads a GGUF's F32/F16/Q4_0/Q4_1/Q8_0 tensors itself (`mx.load(path, return_metadata=True)`), the
quantized ones as its own affine triples (`weight`, `scales`, `biases`, groups of 32), so nothing is
requantized. What this module adds: llama.cpp's tensor names mapped to Hugging Face's, llama.cpp's Q/K row
permutation (its interleaved RoPE layout) undone, mlx-lm's `config.json` with the per-module quantization,
and the byte-level BPE tokenizer rebuilt from the metadata with `tokenizers`. A tensor type MLX cannot read
(K-quants, IQ-quants...) is a GGUFError naming the type, found from the header before anything is loaded.

`python -m mlx_backend.engine.gguf FILE.gguf OUT_DIR [--dtype quantized|float32|bfloat16|float16]`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

import mlx.core as mx

Dtype = Literal["quantized", "float32", "bfloat16", "float16"]
DTYPES: tuple[Dtype, ...] = ("quantized", "float32", "bfloat16", "float16")

# ggml's type ids (ggml.h, `enum ggml_type`), for naming what MLX cannot read.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
MLX_READABLE = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")  # mlx's gguf loader (mlx/io/gguf.cpp)
GROUP_SIZE = 32  # every ggml block type MLX reads holds 32 values per scale
SUPPORTED_PRE_TOKENIZERS = ("smollm", "gpt-2", "default")

# llama.cpp tensor names -> Hugging Face Llama names (convert_hf_to_gguf's map, reversed).
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_PARTS = ("weight", "scales", "biases")


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into an mlx-lm folder; the message says why."""


# -- the header: tensor types, read before MLX touches the file ------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFError("the GGUF file ends inside its header")
    return struct.unpack(fmt, data)[0]


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]), 1)
    elif kind == _STRING:
        f.seek(_read(f, "<Q"), 1)
    elif kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        raise GGUFError(f"unknown GGUF metadata value type {kind}")


def tensor_types(path: Path | str) -> dict[str, str]:
    """Each tensor's ggml type name, from the file's header (GGUF v2/v3)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        version = _read(f, "<I")
        if version not in (2, 3):
            raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        for _ in range(n_kv):
            f.seek(_read(f, "<Q"), 1)  # the key
            _skip_value(f, _read(f, "<I"))
        types = {}
        for _ in range(n_tensors):
            name = f.read(_read(f, "<Q")).decode("utf-8")
            f.seek(8 * _read(f, "<I"), 1)  # the dims
            kind = _read(f, "<I")
            f.seek(8, 1)  # the offset
            types[name] = GGML_TYPES.get(kind, f"type {kind}")
        return types


def check_readable(path: Path | str) -> None:
    unreadable = {name: kind for name, kind in tensor_types(path).items() if kind not in MLX_READABLE}
    if unreadable:
        kinds = ", ".join(sorted(set(unreadable.values())))
        example = next(iter(unreadable))
        raise GGUFError(
            f"{Path(path).name} holds {kinds} tensors (e.g. {example}: {unreadable[example]}), which MLX cannot "
            f"read; MLX reads {', '.join(MLX_READABLE)}. Use a Q4_0, Q4_1 or Q8_0 GGUF of this model, or an "
            "MLX checkpoint."
        )


# -- names, the Q/K permutation ----------------------------------------------------------------------------

def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales`; GGUFError for unknown tensors."""
    stem, _, part = gguf_name.rpartition(".")
    if part not in _PARTS:
        raise GGUFError(f"unexpected tensor {gguf_name}")
    if stem in _TOP_LEVEL:
        return f"{_TOP_LEVEL[stem]}.{part}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match and match.group(2) in _PER_LAYER:
        return f"model.layers.{match.group(1)}.{_PER_LAYER[match.group(2)]}.{part}"
    raise GGUFError(f"tensor {gguf_name} has no Llama counterpart (is this a Llama-architecture GGUF?)")


def unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's `permute` of a Q or K projection (rows = heads x head_dim).

    llama.cpp stores each head's rows as (pair, half) so that its RoPE can rotate adjacent rows; Hugging
    Face's layout is (half, pair), rotating row i with row i + head_dim/2. Rows move whole, so the same
    call undoes it on a quantized weight, its scales and its biases.
    """
    rows = x.shape[0]
    rest = x.shape[1:]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


# -- config and tokenizer ----------------------------------------------------------------------------------

def _meta(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        return value.item()
    return value


def _require(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise GGUFError(f"the GGUF metadata has no {key}")
    return _meta(metadata, key)


def hf_config(metadata: dict[str, Any], tied: bool) -> dict[str, Any]:
    """mlx-lm's config.json for a Llama GGUF (without the quantization entry)."""
    arch = _meta(metadata, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"architecture {arch!r} is not supported (only 'llama')")
    if _meta(metadata, "llama.rope.scaling.type", "none") not in ("none", None):
        raise GGUFError("RoPE scaling is not supported by this converter")
    hidden = int(_require(metadata, "llama.embedding_length"))
    heads = int(_require(metadata, "llama.attention.head_count"))
    head_dim = int(_meta(metadata, "llama.rope.dimension_count", hidden // heads))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_require(metadata, "llama.feed_forward_length")),
        "num_hidden_layers": int(_require(metadata, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_meta(metadata, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_require(metadata, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(metadata, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_require(metadata, "llama.context_length")),
        "vocab_size": len(_require(metadata, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": _meta(metadata, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(metadata, "tokenizer.ggml.eos_token_id"),
    }


def build_tokenizer(metadata: dict[str, Any], chat_template: str | None = None) -> Any:
    """The byte-level BPE of a `gpt2`-model GGUF as a transformers fast tokenizer (save_pretrained-able), with
    the file's chat template unless another is given."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind, pre = _meta(metadata, "tokenizer.ggml.model"), _meta(metadata, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise GGUFError(f"pre-tokenizer {pre!r} is not supported ({', '.join(SUPPORTED_PRE_TOKENIZERS)} are)")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    types = metadata["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in metadata \
        else [1] * len(tokens)
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's tokenizer splits every digit on its own before the byte-level split
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # 3 = CONTROL, 4 = USER_DEFINED (llama.cpp's llama_token_type): never split, never merged
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types, strict=True) if kind in (3, 4)])

    def token(key: str) -> str | None:
        index = _meta(metadata, key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=chat_template or _meta(metadata, "tokenizer.chat_template"),
        model_max_length=int(_require(metadata, "llama.context_length")),
        clean_up_tokenization_spaces=False,
    )


# -- weights -----------------------------------------------------------------------------------------------

def _bits(weight: mx.array, scales: mx.array) -> int:
    """Bits per value of an MLX-quantized weight: its packed uint32 columns against the groups it holds."""
    values = scales.shape[-1] * GROUP_SIZE
    return weight.shape[-1] * 32 // values


def convert_weights(raw: dict[str, mx.array], config: dict[str, Any], dtype: Dtype,
                    ) -> tuple[dict[str, mx.array], dict[str, Any] | None]:
    """GGUF tensors -> HF-named MLX tensors, Q/K un-permuted; and the quantization entry (None: plain)."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    renamed = {hf_name(name): value for name, value in raw.items()}
    for name, value in list(renamed.items()):
        if ".self_attn.q_proj." in name:
            renamed[name] = unpermute_rows(value, heads)
        elif ".self_attn.k_proj." in name:
            renamed[name] = unpermute_rows(value, kv_heads)
    modules = {name.rsplit(".", 1)[0] for name in renamed if name.endswith(".scales")}
    per_module = {m: {"group_size": GROUP_SIZE, "bits": _bits(renamed[f"{m}.weight"], renamed[f"{m}.scales"])}
                  for m in sorted(modules)}
    if dtype == "quantized":
        plain = next((renamed[f"{m}.scales"].dtype for m in modules), mx.float16)
        out = {k: v if k.rsplit(".", 1)[0] in modules else v.astype(plain) for k, v in renamed.items()}
        if not per_module:
            return out, None
        counts: dict[int, int] = {}
        for params in per_module.values():
            counts[params["bits"]] = counts.get(params["bits"], 0) + 1
        common = max(counts, key=lambda b: counts[b])
        quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
        quantization.update({m: p for m, p in per_module.items() if p["bits"] != common})
        return out, quantization
    target = getattr(mx, dtype)
    out = {}
    for name, value in renamed.items():
        module, part = name.rsplit(".", 1)
        if module in modules:
            if part != "weight":
                continue
            value = mx.dequantize(value, renamed[f"{module}.scales"], renamed[f"{module}.biases"],
                                  group_size=GROUP_SIZE, bits=per_module[module]["bits"])
        out[name] = value.astype(target)
    return out, None


def convert(gguf_path: Path | str, out_dir: Path | str, dtype: Dtype = "quantized",
            copy_files: Sequence[Path] = (), chat_template: str | None = None,
            tool_parser: str | None = None) -> Path:
    """Write the mlx-lm folder for a Llama GGUF. The folder appears whole (written aside, then renamed)."""
    if dtype not in DTYPES:
        raise GGUFError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_readable(gguf_path)
    loaded = mx.load(str(gguf_path), return_metadata=True)
    assert isinstance(loaded, tuple)  # (tensors, metadata) with return_metadata
    raw: dict[str, mx.array] = loaded[0]
    metadata: dict[str, Any] = loaded[1]
    config = hf_config(metadata, tied="output.weight" not in raw)
    weights, quantization = convert_weights(raw, config, dtype)
    if quantization is not None:
        config["quantization"] = config["quantization_config"] = quantization
    config["torch_dtype"] = "float16" if dtype == "quantized" else dtype
    tokenizer = build_tokenizer(metadata, chat_template)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
    try:
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save_pretrained(str(staging))
        if tool_parser:  # mlx-lm's parser for the template's tool calls, named rather than inferred
            tokenizer_config = json.loads((staging / "tokenizer_config.json").read_text(encoding="utf-8"))
            tokenizer_config["tool_parser_type"] = tool_parser
            (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n",
                                                           encoding="utf-8")
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        for path in copy_files:  # provenance and license files travel with the weights
            shutil.copyfile(path, staging / Path(path).name)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None, echo: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_backend.engine.gguf", description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=DTYPES, default="quantized")
    parser.add_argument("--copy", type=Path, action="append", default=[], help="a file to put in the folder too")
    parser.add_argument("--chat-template", type=Path, help="a Jinja chat template to use instead of the file's")
    parser.add_argument("--tool-parser", help="mlx-lm's tool parser for that template (e.g. json_tools)")
    args = parser.parse_args(argv)
    template = args.chat_template.read_text(encoding="utf-8") if args.chat_template else None
    try:
        echo(f"wrote {convert(args.gguf, args.out, args.dtype, args.copy, template, args.tool_parser)}")
    except GGUFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
