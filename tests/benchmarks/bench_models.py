"""Random-weight benchmark models of a named shape, made once with the project's tiny-model factory.

A model lives in `<model-dir>/bench-<shape>/` (outside the repo; default /tmp/mlx-gateway-bench/models),
so `mlx-gateway serve --models-dir <model-dir>` serves it under the id `bench-<shape>`. A hidden
marker file records the shape it was made with; a folder whose marker matches is reused.

The output rows of the EOS tokens are zeroed (`silence_eos`), so greedy decoding never ends a
request early: every request generates exactly max_tokens with no logit_bias, on any server, at no
cost per step (the model computes exactly what it did before).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = Path("/tmp/mlx-gateway-bench/models")
MARKER = ".bench-shape.json"

# Keyword arguments for tests.support.tiny_models.make_tiny_model.
SHAPES: dict[str, dict[str, Any]] = {
    # The factory's own default: milliseconds a token, measures serving overhead more than compute.
    "tiny": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
        context_length=512,
        dtype="float16",
    ),
    # Tens of tok/s on a 2-core CPU (bf16 batches better than fp16 or fp32 on MLX's CPU backend).
    "small": dict(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1536,
        vocab_size=8192,
        context_length=2048,
        dtype="bfloat16",
    ),
    # The factory's default with room for an agent's prompt (bench_agent.py on a CPU).
    "agent-tiny": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=2048,
        context_length=32768,
        dtype="bfloat16",
    ),
    # Llama-3.2-1B's shape (about 1.2e9 parameters, 2.5 GB in bf16); the shape of issue 5's GPU figures.
    "llama-3.2-1b": dict(
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        context_length=8192,
        dtype="bfloat16",
    ),
    # Llama-3.2-1B's shape with its context long enough for an agent's prompts (bench_agent.py on a GPU).
    "llama-3.2-1b-agent": dict(
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        context_length=32768,
        dtype="bfloat16",
    ),
}


def model_folder(shape: str, model_dir: Path) -> Path:
    return model_dir / f"bench-{shape}"


def ensure_model(shape: str, model_dir: Path, seed: int = 0) -> Path:
    """The folder of a `shape` model under `model_dir`, made with the factory unless already there."""
    wanted = {"shape": shape, "seed": seed, "model_type": "llama", "eos_rows": "zero", "decoder": "ByteLevel",
              **SHAPES[shape]}
    folder = model_folder(shape, model_dir)
    marker = folder / MARKER
    if marker.is_file() and (folder / "config.json").is_file():
        try:
            if json.loads(marker.read_text()) == wanted:
                return folder
        except ValueError:
            pass
    if folder.exists() and not marker.is_file():
        raise SystemExit(f"{folder} exists and was not made by this benchmark; remove it or pick --model-dir")

    sys.path.insert(0, str(REPO_ROOT))
    try:
        from tests.support.tiny_models import make_tiny_model
    except ImportError as exc:
        raise SystemExit(
            f"the tiny-model factory tests/support/tiny_models.py is missing ({exc}); "
            "pass --model PATH to benchmark an existing model folder"
        ) from exc

    model_dir.mkdir(parents=True, exist_ok=True)
    partial = model_dir / f".partial-bench-{shape}"
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    print(f"making a random {shape} model in {folder} ...", file=sys.stderr, flush=True)
    make_tiny_model(partial, model_type="llama", seed=seed, **SHAPES[shape])
    silence_eos(partial)
    use_byte_level_decoder(partial)
    (partial / MARKER).write_text(json.dumps(wanted, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # atomic: a server never sees a half-written folder
    print(f"made {folder} in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    return folder


def use_byte_level_decoder(folder: Path) -> None:
    """Give the tokenizer a ByteLevel decoder, as Llama 3's has, so mlx-lm streams text with the same
    incremental detokenizer it uses for the real checkpoint. The factory's word-level decoder would get
    mlx-lm's naive one, which re-decodes the whole line at every token and bills every server for a cost
    real models do not have. Encoding is unchanged; decoded text just loses its spaces."""
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(tokenizer))


def silence_eos(folder: Path) -> list[int]:
    """Zero the output-embedding rows of the EOS tokens: their logit is then exactly 0, while among
    thousands of random rows some logit is always above 0, so argmax (temperature 0) never picks EOS."""
    import mlx.core as mx

    config = json.loads((folder / "config.json").read_text())
    eos = config.get("eos_token_id")
    eos_ids = sorted({int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None})
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    eos_token = tokenizer_config.get("eos_token")
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == eos_token:
            eos_ids = sorted({*eos_ids, int(added["id"])})
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        weights, metadata = mx.load(str(file), return_metadata=True)
        name = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
        if name not in weights:
            continue
        matrix = weights[name]
        keep = mx.ones((matrix.shape[0], 1), dtype=matrix.dtype)
        keep[mx.array(eos_ids)] = 0
        weights[name] = matrix * keep
        mx.save_safetensors(str(file), weights, metadata)
        return eos_ids
    raise SystemExit(f"no output embedding found in {folder} to silence EOS")
