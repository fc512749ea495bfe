"""MLX's own launch settings against the engine's ceiling: is the step's host cost a knob away?

On an H100 the 1B shape's decode step is host-bound (the MLX thread's CPU time equals the step's wall time:
`bench_constrained_step.py`), and MLX's CUDA backend batches kernels into CUDA graphs whose size its
environment sets (`MLX_USE_CUDA_GRAPHS`, `MLX_MAX_OPS_PER_BUFFER`, `MLX_MAX_MB_PER_BUFFER`; read once, at
start). This runs `bench_ceiling.py` (stream_generate at c=1, batch_generate at each batch size) in a fresh
process per setting, the settings taking turns for `--rounds` rounds, and prints the median tok/s of each:

    python tests/benchmarks/bench_mlx_env.py --model DIR --variants "default;MLX_USE_CUDA_GRAPHS=0" --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_variant(text: str) -> dict[str, str]:
    """`default` or `NAME=VALUE,NAME=VALUE`."""
    if text.strip() == "default":
        return {}
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    return {name.strip(): value.strip() for name, value in pairs}


def run_ceiling(model: Path, env: dict[str, str], args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One bench_ceiling process under `env`: tok/s per level ("1" is stream_generate)."""
    command = [sys.executable, str(HERE / "bench_ceiling.py"), "--model", str(model), "--batch-sizes",
               args.batch_sizes, "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats),
               "--min-seconds", "1", "--out", str(out)]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=args.timeout)
    if done.returncode != 0:
        print(f"  failed ({done.returncode}): {done.stderr.strip()[-300:]}", file=sys.stderr)
        return {}
    result = json.loads(out.read_text())
    levels = {"1": float(result["single"]["tok_s"])}
    levels.update({size: float(batch["tok_s"]) for size, batch in result["batch"].items()})
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--variants", default="default;MLX_USE_CUDA_GRAPHS=0",
                        help="';'-separated: default, or NAME=VALUE[,NAME=VALUE]")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="bench_ceiling's timed runs (best of)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--budget-s", type=float, default=0, help="start no round past this many seconds")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench-mlx-env"))
    parser.add_argument("--out", type=Path, help="the table, as Markdown")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    args.work_dir.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        if round_index and args.budget_s and time.monotonic() - started > args.budget_s:
            print(f"budget reached after {round_index} rounds", file=sys.stderr)
            break
        for index, variant in enumerate(variants):
            out = args.work_dir / f"ceiling-{round_index}-{index}.json"
            levels = run_ceiling(args.model, parse_variant(variant), args, out)
            print(f"round {round_index} {variant}: {levels}", file=sys.stderr, flush=True)
            if levels:
                results[variant].append(levels)

    level_names = ["1", *[s.strip() for s in args.batch_sizes.split(",") if s.strip()]]
    lines = [
        f"bench_ceiling per MLX setting, median tok/s of {args.rounds} rounds taking turns "
        f"({args.max_tokens} tokens; c=1 is stream_generate, above is batch_generate)",
        "",
        "| setting | runs | " + " | ".join(f"c={n}" for n in level_names) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in level_names) + " |",
    ]
    for variant, runs in results.items():
        cells = [f"{statistics.median(r[n] for r in runs):.0f}" if runs else "-" for n in level_names]
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
