"""Decode and prefill speed of one llama-shaped model computed in float16, bfloat16 and float32 on the CPU.

Why the CPU engine upcasts half-precision weights (mlx_backend/engine/model_load.py, `compute_dtype`): MLX's CPU
kernels run float16 far slower than float32. Random weights (speed does not depend on the values); the
dtypes take turns within each repetition, and the clock is the process's CPU time, so a busy machine (this one
is shared) changes the figures less than wall time would; medians are printed.

    python tests/benchmarks/bench_cpu_dtype.py --shape demo --prompt 512 --reps 3
    python tests/benchmarks/bench_cpu_dtype.py --shape smollm2-135m --prompt 256 --decode 16 --reps 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab
    "demo": (192, 4, 512, 6, 2, 2048),  # the bundled demo model (mlx_backend/demo)
    "smollm2-135m": (576, 30, 1536, 9, 3, 49152),
}
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def build(shape: str, dtype: mx.Dtype) -> llama.Model:
    hidden, layers, inter, heads, kv, vocab = SHAPES[shape]
    args = llama.ModelArgs(model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
                           intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                           rms_norm_eps=1e-5, vocab_size=vocab, tie_word_embeddings=True)
    mx.random.seed(0)
    model = llama.Model(args)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def measure(model: llama.Model, prompt: int, decode: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) per CPU second, one token at a time as the solo path decodes."""
    tokens = mx.random.randint(0, 1000, (1, prompt))
    cache = make_prompt_cache(model)
    started = time.process_time()
    logits = model(tokens, cache=cache)
    mx.eval(logits, [c.state for c in cache])
    prefill_s = time.process_time() - started
    token = mx.argmax(logits[:, -1:], axis=-1)
    started = time.process_time()
    for _ in range(decode):
        token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
        mx.eval(token)
    return prompt / prefill_s, decode / (time.process_time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    mx.set_default_device(mx.cpu)
    models = {name: build(args.shape, dtype) for name, dtype in DTYPES.items()}
    for model in models.values():
        measure(model, 16, 2)  # warm-up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(args.reps):
        for name, model in models.items():
            results[name].append(measure(model, args.prompt, args.decode))
    print(f"shape {args.shape}, prompt {args.prompt} tokens, {args.decode} decoded, median of {args.reps}, "
          "tokens per second of process CPU time")
    print(f"{'dtype':<10}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for name, runs in results.items():
        print(f"{name:<10}{statistics.median(r[0] for r in runs):>15.0f}{statistics.median(r[1] for r in runs):>14.1f}")


if __name__ == "__main__":
    main()
