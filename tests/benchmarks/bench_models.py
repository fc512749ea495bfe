"""Random-weight benchmark models of a named shape, made once with the project's tiny-model factory.

A model lives in `<model-dir>/bench-<shape>/` (outside the repo; default /tmp/mlx-gateway-bench/models),
so `mlx-gateway serve --models-dir <model-dir>` serves it under the id `bench-<shape>`. A hidden
marker file records the shape it was made with; a folder whose marker matches is reused.
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
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 vocab_size=512, context_length=512, dtype="float16"),
    # Tens of tok/s on a 2-core CPU (bf16 batches better than fp16 or fp32 on MLX's CPU backend).
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536,
                  vocab_size=8192, context_length=2048, dtype="bfloat16"),
    # Llama-3.2-1B's shape (about 1.2e9 parameters, 2.5 GB in bf16); the shape of issue 5's GPU figures.
    "llama-3.2-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                         intermediate_size=8192, vocab_size=128256, context_length=8192, dtype="bfloat16"),
}


def model_folder(shape: str, model_dir: Path) -> Path:
    return model_dir / f"bench-{shape}"


def ensure_model(shape: str, model_dir: Path, seed: int = 0) -> Path:
    """The folder of a `shape` model under `model_dir`, made with the factory unless already there."""
    wanted = {"shape": shape, "seed": seed, "model_type": "llama", **SHAPES[shape]}
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
        raise SystemExit(f"the tiny-model factory tests/support/tiny_models.py is missing ({exc}); "
                         "pass --model PATH to benchmark an existing model folder") from exc

    model_dir.mkdir(parents=True, exist_ok=True)
    partial = model_dir / f".partial-bench-{shape}"
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    print(f"making a random {shape} model in {folder} ...", file=sys.stderr, flush=True)
    make_tiny_model(partial, model_type="llama", seed=seed, **SHAPES[shape])
    (partial / MARKER).write_text(json.dumps(wanted, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # atomic: a server never sees a half-written folder
    print(f"made {folder} in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    return folder
