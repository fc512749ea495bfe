"""Decode speed of one engine against the engine as a two-rank group (ring backend on loopback), through the
gateway, on a random model of a benchmark shape (issue 12). A script, not a test.

    python tests/benchmarks/bench_group.py --shape small --tokens 128 --repeats 3 --concurrency 1,4

On one machine the two ranks share its cores and talk over loopback: this measures what the group costs
(a collective per layer, one control round per step), not the speed-up two machines give.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from tests.benchmarks.bench_models import DEFAULT_MODEL_DIR, ensure_model  # noqa: E402
from tests.support.server import ServerProcess, free_port_pair  # noqa: E402


def stream_once(base_url: str, model: str, tokens: int, index: int) -> tuple[float, float, int]:
    """(seconds to the first token, decode tok/s after it, tokens) for one streamed greedy request."""
    body = {"model": model, "messages": [{"role": "user", "content": f"story number {index}"}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    first = last = 0.0
    count = 0
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.monotonic()
                first = first or last
    return first - started, (count - 1) / (last - first) if last > first else 0.0, count


def measure(server: ServerProcess, model: str, tokens: int, repeats: int, concurrency: int) -> dict[str, float]:
    stream_once(server.base_url, model, 8, 0)  # load the model, warm up
    rates, totals, ttfts = [], [], []
    for r in range(repeats):
        started = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda i: stream_once(server.base_url, model, tokens, i),
                                    range(r * 100, r * 100 + concurrency)))
        elapsed = time.monotonic() - started
        rates.append(statistics.median(rate for _, rate, _ in results))
        totals.append(sum(n for _, _, n in results) / elapsed)
        ttfts.append(statistics.median(t for t, _, _ in results))
    return {"stream_tok_s": statistics.median(rates), "total_tok_s": statistics.median(totals),
            "ttft_s": statistics.median(ttfts)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4")
    args = parser.parse_args()
    folder = ensure_model(args.shape, args.model_dir)
    model = folder.name
    logs = Path(tempfile.mkdtemp(prefix="bench-group-"))
    common = ["--models-dir", str(args.model_dir), "--prompt-cache-gb", "0"]
    setups = {"1 engine": common,
              "2 ranks (ring, loopback)": [*common, "--group-host", "127.0.0.1", "--group-host", "127.0.0.1",
                                           "--group-port", str(free_port_pair())]}
    rows = []
    for name, server_args in setups.items():
        server = ServerProcess(server_args, logs / f"{len(rows)}.log").start()
        try:
            server.wait_ready(120)
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                figures = measure(server, model, args.tokens, args.repeats, concurrency)
                rows.append((name, concurrency, figures))
                print(name, concurrency, figures, file=sys.stderr, flush=True)
        finally:
            server.stop()
    print(f"\n{args.shape} shape, {args.tokens} tokens per request, greedy, median of {args.repeats}\n")
    print("| engine | concurrent streams | tok/s per stream | tok/s in all | time to first token |")
    print("| --- | --- | --- | --- | --- |")
    for name, concurrency, f in rows:
        print(f"| {name} | {concurrency} | {f['stream_tok_s']:.1f} | {f['total_tok_s']:.1f} | {f['ttft_s']:.2f} s |")


if __name__ == "__main__":
    main()
