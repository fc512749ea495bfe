"""Where a decode step's time goes on the device: building the graph, launching it, the device's own work.

    python tests/benchmarks/bench_step_split.py --model DIR --batch-sizes 1,8,32,64

For each batch size, a plain decode loop on the model (its own KV cache, one token per row and step):
- serial: build the step's graph in Python, launch it (`mx.async_eval`), wait for it; the three times apart;
- pipelined: the next step launched before the last one's tokens are read, as mlx-lm's generators do;
- pipelined, with logprobs as mlx-lm 0.32.2's GenerationBatch makes them: normalized, sampled from, and split
  into one array per row (`list(logprobs)`), every row evaluated with the tokens; or kept as one array.
If the pipelined step takes about build + launch, the host is the limit and the device waits for it; if it
takes about build + launch + wait, the device is. A CUDA sync may spin, so a busy MLX thread alone does not
say which (py-spy counts the spin as work). Medians over `--steps` steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def decode_loop(model: Any, batch: int, steps: int, context: int, pipelined: bool,
                logprobs: str = "none") -> dict[str, float]:
    """`logprobs`: "none" (argmax of the logits), "per row" (mlx-lm's way) or "batch" (one array)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    prompt = mx.zeros((batch, context), dtype=mx.int32)
    mx.eval(model(prompt, cache=cache))  # a context of `context` tokens per row
    y = mx.zeros((batch, 1), dtype=mx.int32)
    build, launch, wait, total = [], [], [], []

    def forward(tokens: Any) -> tuple[Any, list[Any]]:
        logits = model(tokens, cache=cache)[:, -1, :]
        if logprobs == "none":
            return mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32), []
        normalized = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = mx.argmax(normalized, axis=-1, keepdims=True).astype(mx.int32)
        return sampled, list(normalized) if logprobs == "per row" else [normalized]

    if pipelined:
        y, extra = forward(y)
        mx.async_eval(y, extra)
    for _ in range(steps):
        t0 = time.perf_counter()
        following, extra = forward(y)
        t1 = time.perf_counter()
        mx.async_eval(following, extra)
        t2 = time.perf_counter()
        if pipelined:
            y.tolist()  # the previous step's tokens, while this one runs
            y = following
        else:
            following.tolist()
            y = following
        t3 = time.perf_counter()
        build.append(t1 - t0)
        launch.append(t2 - t1)
        wait.append(t3 - t2)
        total.append(t3 - t0)
    if pipelined:
        y.tolist()
    med = statistics.median
    return {"build_us": 1e6 * med(build), "launch_us": 1e6 * med(launch), "wait_us": 1e6 * med(wait),
            "step_us": 1e6 * med(total)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--context", type=int, default=128, help="tokens in each row's cache before the steps")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(args.model))
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    lines = [
        f"bench_step_split on {mx.default_device()}, mlx {mx.__version__}: µs per decode step, median of "
        f"{args.steps} (context {args.context})",
        "",
        "| rows | way | build | launch | wait | step | tok/s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch in sizes:
        decode_loop(model, batch, 5, args.context, pipelined=True)  # kernels for the shapes, first
        for pipelined, logprobs in ((False, "none"), (True, "none"), (True, "per row"), (True, "batch")):
            r = decode_loop(model, batch, args.steps, args.context, pipelined, logprobs)
            way = ("pipelined" if pipelined else "serial") + ("" if logprobs == "none" else f", logprobs {logprobs}")
            lines.append(f"| {batch} | {way} | {r['build_us']:.0f} | {r['launch_us']:.0f} | {r['wait_us']:.0f} | "
                         f"{r['step_us']:.0f} | {batch * 1e6 / r['step_us']:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
