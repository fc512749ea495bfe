"""What a continuous batch loses to its device waits, in one process and with no HTTP.

    python tests/benchmarks/bench_batch_step.py --shape llama-3.2-1b [--clients 8,32,64] [--repeat 2]

Clients in a closed loop (client i sends its first request at step i, then its next as soon as one ends,
`--rounds` each), driven through mlx-lm's BatchGenerator and through our Batcher, beside the one-wave ceiling
(every prompt at once, `batch_generate`'s way) at the same batch size. Variants, run interleaved:
- `mlx-lm's filter and prompt pass`: mlx-lm 0.32.2's BatchKVCache.filter, which waits for the step in flight
  when a row leaves, and its prompt pass, which waits for each pass;
- `our filter`: mlx_backend/engine/batch_cache.py's filter, which does not wait (mlx-lm's prompt pass);
- `prefill N`: prompts prefilled together per pass (BatchGenerator's prefill_batch_size, our `--prefill-batch`);
- `prompt pass queued`: batch_cache.py's prompt pass too (the engine's way on a GPU).
Each figure is the median of `--repeat` runs; ratios are to the one-wave ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx.core as mx
from mlx_lm import load

from mlx_backend.engine import batch_cache, joining
from tests.benchmarks.bench_engine_layers import (
    closed_loop_batcher,
    closed_loop_generator,
    timed_batch_generator,
    timed_stream_generate,
)
from tests.benchmarks.bench_models import SHAPES, ensure_model


@contextlib.contextmanager
def variant(filter_: bool, queued_prompt: bool, join: bool) -> Iterator[None]:
    """mlx-lm's own methods, or ours: the filter, the prompt pass queued (batch_cache.py), new rows joining the
    step (joining.py). The Batcher made inside keeps the variant: its own installs are held off meanwhile."""
    install, join_in_step = batch_cache.install, joining.join_in_step
    batch_cache.uninstall()
    if filter_:
        install(gpu=queued_prompt)
    batch_cache.install = lambda gpu: None  # type: ignore[assignment]
    if not join:
        joining.join_in_step = lambda generator: None
    try:
        yield
    finally:
        batch_cache.install, joining.join_in_step = install, join_in_step  # type: ignore[assignment]
        install(gpu=mx.default_device().type == mx.gpu)


def median_of(repeat: int, run: Callable[..., tuple[float, float, int]], *args: Any) -> tuple[float, float, int]:
    """Medians of tok/s and TTFT; the passes of the first run (the loop is the same every run)."""
    results = [run(*args) for _ in range(repeat)]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), results[0][2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/mlx-gateway-bench/models"))
    parser.add_argument("--clients", default="8,32,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--prefill", default="8,32", help="prefill batch sizes to compare")
    parser.add_argument("--gather-steps", type=int, default=2, help="our Batcher's prefill_gather_steps")
    args = parser.parse_args()
    folder = ensure_model(args.shape, args.model_dir)
    model, tokenizer = load(str(folder))
    print(f"# {args.shape} on {mx.default_device()}, {args.max_tokens} new tokens, {args.rounds} requests per "
          f"client, greedy; median of {args.repeat}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    timed_stream_generate(model, tokenizer, 16)
    timed_batch_generator(model, tokenizer, 8, 16)
    prefills = [int(p) for p in args.prefill.split(",")]
    last = prefills[-1]
    variants = [(f"mlx-lm's filter and prompt pass, prefill {last}", False, last, False, False)]
    variants += [(f"our filter, prefill {p}", True, p, False, False) for p in prefills]
    variants += [(f"our filter, prefill {last}, prompt pass queued", True, last, True, False)]
    variants += [(f"our filter, prefill {last}, prompt pass queued, rows join the step", True, last, True, True)]
    print("\n| clients | variant | driver | tok/s | ratio to one wave | TTFT p50 ms | passes per 100 tokens |"
          "\n|---:|---|---|---:|---:|---:|---:|", flush=True)
    for clients in [int(c) for c in args.clients.split(",")]:
        wave = max(timed_batch_generator(model, tokenizer, clients, args.max_tokens) for _ in range(3))
        tokens = clients * args.rounds * args.max_tokens
        print(f"| {clients} | one wave (batch_generate's way) | BatchGenerator | {wave:.0f} | 1.00 | - | - |",
              flush=True)
        for name, filter_, prefill, queued_prompt, join in variants:
            with variant(filter_, queued_prompt, join):
                raw = median_of(args.repeat, closed_loop_generator, model, tokenizer, clients, args.max_tokens,
                                args.rounds, prefill, join)
                ours = median_of(args.repeat, closed_loop_batcher, folder, model, clients, args.max_tokens,
                                 args.rounds, args.gather_steps, prefill)
            for driver, (rate, ttft, passes) in (("BatchGenerator", raw), ("our Batcher", ours)):
                print(f"| {clients} | {name} | {driver} | {rate:.0f} | {rate / wave:.2f} | {ttft:.1f} | "
                      f"{100 * passes / tokens:.1f} |", flush=True)


if __name__ == "__main__":
    main()
