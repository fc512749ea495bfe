"""The engine's own ceiling, no HTTP: `stream_generate` for one stream, `batch_generate` per batch size.

Run in its own process by bench_serving.py (so its memory and threads are gone before a server
starts), or by hand:

    python tests/benchmarks/bench_ceiling.py --model DIR --batch-sizes 8,32 --out /tmp/ceiling.json

It also picks the prompt words (each one token) that the HTTP load reuses, and finds out whether the
random model emits EOS before `--max-tokens`; if so, it and the HTTP load bias EOS away so that
every request generates the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import EOS_BIAS, make_prompt


def prompt_words(tokenizer: Any, limit: int = 2000) -> list[str]:
    """Vocabulary words that encode to exactly one token on their own (bounded scan)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words: list[str] = []
    misses = 0
    for token_id in range(tokenizer.vocab_size):
        if token_id in special:
            continue
        word = tokenizer.decode([token_id]).strip()
        if word.isalnum() and word.isascii() and len(tokenizer.encode(word, add_special_tokens=False)) == 1:
            words.append(word)
            misses = 0
        else:
            misses += 1
        # Enough words, or a long run of tokens that are not words (e.g. the factory's synthetic "w123",
        # which its tokenizer splits into digits): stop scanning a 128k vocabulary.
        if len(words) >= limit or (misses > 2000 and len(words) >= 32):
            break
    if not words:
        raise SystemExit("no single-token words in the tokenizer's vocabulary")
    return words


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids)


def run_single(
    model: Any, tokenizer: Any, ids: list[int], max_tokens: int, processors: list[Any]
) -> dict[str, Any]:
    from mlx_lm import stream_generate

    started = time.perf_counter()
    ttft = None
    last = None
    for response in stream_generate(
        model, tokenizer, ids, max_tokens=max_tokens, logits_processors=processors
    ):
        if ttft is None:
            ttft = time.perf_counter() - started
        last = response
    wall = time.perf_counter() - started
    assert last is not None
    return {
        "tokens": last.generation_tokens,
        "wall_s": wall,
        "tok_s": last.generation_tokens / wall,
        "decode_tok_s": last.generation_tps,
        "prompt_tok_s": last.prompt_tps,
        "ttft_s": ttft,
        "prompt_tokens": last.prompt_tokens,
        "finish_reason": last.finish_reason,
        "peak_memory_gb": last.peak_memory,
    }


def run_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_tokens: int,
    processors: list[Any],
    prefill_batch_size: int,
) -> dict[str, Any]:
    from mlx_lm import batch_generate

    started = time.perf_counter()
    result = batch_generate(
        model,
        tokenizer,
        prompts,
        max_tokens=max_tokens,
        return_token_ids=True,
        completion_batch_size=len(prompts),
        prefill_batch_size=prefill_batch_size,
        logits_processors=processors or None,
    )
    wall = time.perf_counter() - started
    lengths = [len(t) for t in result.token_ids or []]
    total = sum(lengths)
    return {
        "batch": len(prompts),
        "tokens": total,
        "wall_s": wall,
        "tok_s": total / wall,
        "decode_tok_s": result.stats.generation_tps,
        "prompt_tok_s": result.stats.prompt_tps,
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "peak_memory_gb": result.stats.peak_memory,
    }


def repeat(measure: Callable[[], dict[str, Any]], repeats: int, min_seconds: float) -> list[dict[str, Any]]:
    """At least `repeats` runs, more (up to 20) while under `min_seconds`: short runs are noisy."""
    runs: list[dict[str, Any]] = []
    spent = 0.0
    while len(runs) < repeats or (runs and spent < min_seconds and len(runs) < 20):
        runs.append(measure())
        spent += runs[-1]["wall_s"]
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument(
        "--prompt-tokens", type=int, default=64, help="words (tokens) of user text per prompt"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="8,32,64", help="comma-separated; empty for none")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is the ceiling")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=3.0,
        help="repeat a measurement past --repeats until this much time was spent (at most 20 runs)",
    )
    parser.add_argument(
        "--prefill-batch-size", type=int, default=8, help="batch_generate's (and mlx_lm.server's) default"
    )
    parser.add_argument(
        "--eos",
        choices=["auto", "bias", "none"],
        default="auto",
        help="auto: bias EOS away only if the model stops early without it",
    )
    parser.add_argument(
        "--prompt-only", action="store_true", help="only pick the prompt words and probe EOS; time nothing"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.prompt_only:
        args.repeats, args.batch_sizes = 0, ""
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_logits_processors

    t_load = time.perf_counter()
    model, tokenizer = mlx_lm.load(str(args.model))
    load_s = time.perf_counter() - t_load
    words = prompt_words(tokenizer)
    eos_ids = sorted(int(t) for t in tokenizer.eos_token_ids)
    texts = [make_prompt(words, args.prompt_tokens, i) for i in range(max([1, *batch_sizes]))]
    prompts = [chat_ids(tokenizer, t) for t in texts]

    # Warm-up, and the EOS probe: greedy decoding of a random model can hit EOS at any step.
    probe = [run_single(model, tokenizer, prompts[i % len(prompts)], args.max_tokens, []) for i in range(2)]
    early = [p["tokens"] for p in probe if p["tokens"] < args.max_tokens]
    eos_bias = args.eos == "bias" or (args.eos == "auto" and bool(early))
    bias = {t: EOS_BIAS for t in eos_ids}
    processors = make_logits_processors(logit_bias=bias) if eos_bias else []
    if args.repeats == 0:
        args.min_seconds = 0.0
    print(
        f"ceiling: loaded in {load_s:.1f}s; EOS bias {'on' if eos_bias else 'off'} "
        f"(probe lengths {[p['tokens'] for p in probe]})",
        file=sys.stderr,
        flush=True,
    )

    singles = repeat(
        lambda: run_single(model, tokenizer, prompts[0], args.max_tokens, processors),
        args.repeats,
        args.min_seconds,
    )
    best_single = max(singles, key=lambda r: r["tok_s"]) if singles else None
    if best_single:
        print(
            f"ceiling: stream_generate {best_single['tok_s']:.1f} tok/s end to end, "
            f"{best_single['decode_tok_s']:.1f} decode",
            file=sys.stderr,
            flush=True,
        )

    batches: dict[str, Any] = {}
    for size in batch_sizes:
        batch_prompts = prompts[:size]
        # Warm-up at this batch size: kernels for new shapes are built on first use on a GPU.
        run_batch(
            model, tokenizer, batch_prompts, min(8, args.max_tokens), processors, args.prefill_batch_size
        )
        runs = repeat(
            lambda batch_prompts=batch_prompts: run_batch(
                model, tokenizer, batch_prompts, args.max_tokens, processors, args.prefill_batch_size
            ),
            args.repeats,
            args.min_seconds,
        )
        best = max(runs, key=lambda r: r["tok_s"])
        best["runs_tok_s"] = [r["tok_s"] for r in runs]
        batches[str(size)] = best
        print(
            f"ceiling: batch_generate x{size}: {best['tok_s']:.1f} tok/s end to end, "
            f"{best['decode_tok_s']:.1f} decode",
            file=sys.stderr,
            flush=True,
        )

    out = {
        "model": str(args.model),
        "load_s": load_s,
        "prompt_tokens": probe[0]["prompt_tokens"],
        "max_tokens": args.max_tokens,
        "eos_ids": eos_ids,
        "eos_bias": eos_bias,
        "probe_lengths": [p["tokens"] for p in probe],
        "words": words,
        "single": best_single,
        "single_runs_tok_s": [r["tok_s"] for r in singles],
        "batch": batches,
        "prefill_batch_size": args.prefill_batch_size,
        "repeats": args.repeats,
        "device": str(mx.default_device()),
        "platform": platform.platform(),
    }
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
