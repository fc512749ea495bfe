"""Constrained decoding under load: tok/s with `response_format: json_schema` and with a forced tool call,
beside the same load unconstrained, through the gateway (issue 9's benchmark row; target: constrained >= 0.9
of unconstrained).

A random-weight model of a named shape wears Qwen2.5's chat template (tools in the prompt, `<tool_call>`
markup) on a byte-level vocabulary of the shape's size, with its EOS rows zeroed so that no request ends
early. The schemas ask for a string far longer than max_tokens, so every request of every workload
generates exactly max_tokens: the rate differs only by what the grammar costs per token. Streaming, greedy,
`--repeat` rounds of every (workload, level) pair, interleaved; the table gives each cell's median.

    python tests/benchmarks/bench_constrained_serving.py --shape small --concurrency 1,8 --repeat 3

`--real-model` runs the same on the bundled SmolLM2-135M-Instruct (a real trained model, with its own
tools-capable template, tests/support/real_model.py) instead of a random shape; its EOS is banned with
logit_bias, so every request still generates exactly max_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_load import run_level
from bench_models import SHAPES, silence_eos
from bench_servers import Server, free_port, server_spec, stop_all

LONG_TEXT = {"type": "string", "minLength": 100_000}  # never complete within max_tokens
SCHEMA = {"type": "object", "properties": {"text": LONG_TEXT}, "required": ["text"], "additionalProperties": False}
WORKLOADS: dict[str, dict[str, Any]] = {
    "unconstrained": {},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "essay", "strict": True, "schema": SCHEMA}}},
    "forced tool call": {"tools": [{"type": "function", "function": {"name": "write", "parameters": SCHEMA}}],
                         "tool_choice": {"type": "function", "function": {"name": "write"}},
                         "parallel_tool_calls": False},
}


def make_model(shape: str, root: Path) -> Path:
    from tests.support.tiny_models import make_tiny_model

    folder = root / f"bench-qwen-{shape}"
    if not (folder / "config.json").is_file():
        started = time.monotonic()
        shape_args = {**SHAPES[shape], "context_length": max(4096, SHAPES[shape]["context_length"])}  # tools' prompt
        make_tiny_model(folder, chat_format="qwen2.5", **shape_args)
        silence_eos(folder)
        print(f"made {folder} in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--real-model", action="store_true", help="SmolLM2-135M-Instruct instead of a shape")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mlx-gateway-bench/constrained"))
    parser.add_argument("--out", type=Path, help="write the table (markdown) and the figures (.json) here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    no_eos: dict[str, Any] = {}
    if args.real_model:
        from tests.support.real_model import ensure_smollm2

        model = ensure_smollm2()
        eos = json.loads((model / "config.json").read_text())["eos_token_id"]
        no_eos = {"logit_bias": {str(t): -100 for t in (eos if isinstance(eos, list) else [eos])}}
    else:
        model = make_model(args.shape, args.work_dir / "models")
    port = free_port()
    server = Server(server_spec("gateway", model, port, max_running=max(levels), max_queue=256,
                                extra_args=["--stall-timeout-s", "600"]),
                    port, args.work_dir / "gateway.log").start()
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        server.wait_ready(300)
        count = 4 * max(levels) * args.requests_per_client
        prompts = [f"Write about topic number {i} at length." for i in range(count)]
        base = {"model": model.name, "stream": True, "temperature": 0, "max_tokens": args.max_tokens,
                "stream_options": {"include_usage": True}, **no_eos}
        # Warm up every workload at every level: compilation, the grammar tokenizer, batch shapes.
        for extra in WORKLOADS.values():
            for level in levels:
                asyncio.run(run_level(server.base_url, {**base, **extra}, prompts, level, 1, 600, 300))
        for round_ in range(args.repeat):
            for level in levels:
                for name, extra in WORKLOADS.items():
                    result = asyncio.run(run_level(server.base_url, {**base, **extra}, prompts, level,
                                                   args.requests_per_client, 600, 300)).summary()
                    if result["failed"] or result["min_tokens"] != args.max_tokens:
                        raise SystemExit(f"{name} at {level}: {result}")
                    rates.setdefault((name, level), []).append(result["tok_s"])
                    print(f"round {round_ + 1} c={level} {name}: {result['tok_s']:.1f} tok/s", file=sys.stderr,
                          flush=True)
    finally:
        server.stop()
        stop_all()
    what = "SmolLM2-135M-Instruct" if args.real_model else f"{args.shape} shape"
    lines = [f"Constrained decoding under load ({what}, {args.max_tokens} tokens per streamed request, "
             f"greedy; median of {args.repeat} rounds; ratio to unconstrained at the same level)", "",
             "| workload | " + " | ".join(f"c={c} tok/s | ratio" for c in levels) + " |",
             "| --- | " + " | ".join("--- | ---" for _ in levels) + " |"]
    for name in WORKLOADS:
        cells = []
        for level in levels:
            rate = statistics.median(rates[(name, level)])
            base_rate = statistics.median(rates[("unconstrained", level)])
            cells.append(f"{rate:.1f} | {rate / base_rate:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {f"{name}@{level}": values for (name, level), values in rates.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
