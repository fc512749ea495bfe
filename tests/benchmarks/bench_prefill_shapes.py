"""What a prefill pass of a shape the device has not seen costs, against the same shape again.

    python tests/benchmarks/bench_prefill_shapes.py --model DIR [--rows 1,3,7,8] [--lengths 60,68,75]

A continuous batch prefills whatever arrived together: the rows and their padded lengths change from pass to
pass. On CUDA, MLX's attention over a prompt (more than one query) goes to cuDNN, which builds a plan per shape
(`MLX_CUDA_USE_CUDNN_SDPA`, `MLX_CUDA_SDPA_CACHE_SIZE`); if that build is slow, each new shape lands on the time
to first token of every request in that pass. Each (rows, length) pass runs twice on fresh caches, the first
time for that shape in this process; the table gives both, and the median over shapes. Run it once per setting
(an environment variable is read once, at start).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rows", default="1,3,7,8")
    parser.add_argument("--lengths", default="60,68,75,90")
    parser.add_argument("--label", default="", help="what this run's setting is, for the table")
    args = parser.parse_args(argv)

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(args.model))

    def prefill(rows: int, length: int) -> float:
        cache = make_prompt_cache(model)
        tokens = mx.array([[(7 * r + i) % 1000 + 1 for i in range(length)] for r in range(rows)])
        began = time.perf_counter()
        mx.eval(model(tokens, cache=cache))
        return 1000 * (time.perf_counter() - began)

    prefill(2, 17)  # the model's first pass: weights and kernels every shape shares
    firsts, agains = [], []
    lines = [f"prefill passes on {mx.default_device()} {args.label}: ms, first time for the shape / again",
             "", "| rows | length | first | again |", "| ---: | ---: | ---: | ---: |"]
    for rows in (int(r) for r in args.rows.split(",")):
        for length in (int(n) for n in args.lengths.split(",")):
            first, again = prefill(rows, length), prefill(rows, length)
            firsts.append(first)
            agains.append(again)
            lines.append(f"| {rows} | {length} | {first:.1f} | {again:.1f} |")
    lines.append(f"| median | | {statistics.median(firsts):.1f} | {statistics.median(agains):.1f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
