"""MLX on the CPU with each BLAS the engine can be given (mlx_backend/cpu_blas.py): matrix products, and the
bundled real model's prompt and decode speed, each setting in a fresh process as the engine starts.

    python tests/benchmarks/bench_cpu_blas.py [--settings off,auto] [--rounds 3]

Settings take turns for `--rounds` rounds; the table has medians. SmolLM2-135M-Instruct is converted as `serve`
converts it on this machine (float32 on the CPU); prompts of ~40 and ~500 tokens, 48 tokens decoded, greedy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

MEASURE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_backend import cpu_blas
from tests.support.real_model import ensure_smollm2

out = {"blas": cpu_blas.in_use()}
for name, (m, k, n) in {"prompt-shaped product GFLOP/s": (512, 2048, 2048),
                        "decode-shaped product GFLOP/s": (1, 2048, 2048)}.items():
    a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
    mx.eval(a, b)
    times = []
    for _ in range(5):
        began = time.perf_counter(); mx.eval(a @ b); times.append(time.perf_counter() - began)
    out[name] = 2 * m * k * n / sorted(times)[2] / 1e9
model, tokenizer = load(str(ensure_smollm2()))
for label, text in (("short", "Write a story about a dragon."), ("long", "Here are the rules of the project. " * 60)):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
    for _ in range(2):  # the second run is the one kept
        last = list(stream_generate(model, tokenizer, prompt, max_tokens=48))[-1]
    out[f"{label} prompt tokens"] = last.prompt_tokens
    out[f"{label} prompt tok/s"] = last.prompt_tps
    out[f"{label} decode tok/s"] = last.generation_tps
print(json.dumps(out))
"""


def measure(setting: str) -> dict[str, object]:
    from mlx_backend import cpu_blas

    environ = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(REPO)], env={**environ, **cpu_blas.engine_env(setting)},
                          capture_output=True, text=True, timeout=900, check=True)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="off,auto")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    settings = [s for s in args.settings.split(",") if s]
    runs: dict[str, list[dict[str, object]]] = {s: [] for s in settings}
    for round_index in range(args.rounds):
        for setting in settings:
            runs[setting].append(measure(setting))
            print(f"round {round_index} {setting}: {runs[setting][-1]}", file=sys.stderr, flush=True)
    keys = [k for k in runs[settings[0]][0] if k != "blas"]
    lines = [f"MLX on the CPU per cpu_blas setting, medians of {args.rounds} rounds taking turns", "",
             "| measure | " + " | ".join(settings) + " |", "| --- | " + " | ".join("---:" for _ in settings) + " |",
             "| library | " + " | ".join(str(runs[s][0]["blas"]).split(" (")[0] for s in settings) + " |"]
    for key in keys:
        cells = [statistics.median(float(r[key]) for r in runs[s]) for s in settings]  # type: ignore[arg-type]
        lines.append(f"| {key} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
