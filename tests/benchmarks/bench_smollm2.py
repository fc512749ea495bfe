"""Decode tok/s of the bundled real model, SmolLM2-135M-Instruct as `serve` converts it on this machine (float32
on MLX's CPU backend, 4-bit on a Mac): mlx-lm in process (the ceiling), mlx_lm.server, and the gateway. One
streaming request at a time, the same prompt, greedy, median of --runs (issue 25).

Decode tok/s of a request = (tokens - 1) / (time of its last token - time of its first): prefill excluded.

  python tests/benchmarks/bench_smollm2.py [--runs 3] [--max-tokens 64] [--dtype float32|quantized|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_common import cpu_model, loads
from bench_servers import Server, free_port, server_spec, stop_all

from tests.support.real_model import ensure_smollm2

PROMPT = "Write a long story about a dragon who learns to fly."


def ceiling(folder: Path, max_tokens: int, runs: int) -> list[float]:
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(folder))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           tokenize=False)
    rates = []
    for _ in range(runs):
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))
        rates.append(responses[-1].generation_tps)
    return rates


def one_request(base_url: str, model: str, max_tokens: int) -> tuple[float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    stamps: list[float] = []
    with httpx.Client(timeout=600) as client, client.stream("POST", base_url + "/v1/chat/completions",
                                                             json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = loads(line[6:])
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                stamps.append(time.perf_counter())
    tokens = len(stamps)  # both servers send one content chunk per generated token here
    return ((tokens - 1) / (stamps[-1] - stamps[0]) if tokens > 1 else 0.0), tokens


def serve_and_measure(name: str, folder: Path, max_tokens: int, runs: int, logs: Path) -> list[float]:
    spec = server_spec(name, folder, free_port())
    server = Server(spec, int(spec.argv[spec.argv.index("--port") + 1]), logs / f"{name}.log").start()
    try:
        server.wait_ready(300)
        one_request(server.base_url, spec.model_id, 4)  # warm-up: the model loads on first use
        rates = []
        for _ in range(runs):
            rate, tokens = one_request(server.base_url, spec.model_id, max_tokens)
            print(f"  {name}: {rate:.2f} tok/s over {tokens} tokens", flush=True)
            rates.append(rate)
        return rates
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="the conversion to measure (default: this machine's)")
    args = parser.parse_args()
    folder = ensure_smollm2(args.dtype)
    print(f"{folder} on {cpu_model()}", flush=True)
    results: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("mlx_lm", "gateway"):
                results[name] = serve_and_measure(name, folder, args.max_tokens, args.runs, Path(tmp))
        results["mlx-lm in process (ceiling)"] = ceiling(folder, args.max_tokens, args.runs)
    finally:
        stop_all()
    print(f"\ndecode tok/s, median of {args.runs} (one request at a time, {args.max_tokens} tokens max):")
    for name, rates in results.items():
        print(f"  {name:30s} {statistics.median(rates):6.2f}   (runs: {', '.join(f'{r:.2f}' for r in rates)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
