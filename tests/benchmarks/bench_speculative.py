"""Speculative decoding of a lone request (drafts from its prompt, its prediction and its output), on the bundled
real model: SmolLM2-135M-Instruct as `serve` converts it here. One streaming request at a time, greedy, median
of --runs, for three workloads:

- edit + prediction: "rename a function in this code and print it all", with the code as OpenAI's `prediction`;
- edit: the same request without the prediction (drafts from the prompt and the output);
- story: free text, where few drafts match (what drafting costs when it does not pay).

Servers: mlx_lm.server (as its users run it, and with the engine's BLAS preloaded: the same matrix products as
ours), the gateway with `--draft-tokens 0` (one token a pass) and with its default; beside them the engine's
ceiling for one token a pass, mlx-lm's stream_generate in a process with the engine's BLAS. Decode tok/s of a
request = (completion tokens - 1) / (time of its last text - time of its first): prefill excluded. The table
also says whether each gateway's text is the one-token-a-pass text, and the draft tokens kept and dropped.

  python tests/benchmarks/bench_speculative.py [--runs 3] [--max-tokens 160] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_common import cpu_model, loads
from bench_servers import Server, free_port, server_spec, stop_all

from mlx_backend import cpu_blas
from tests.support.real_model import ensure_smollm2

CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


def factorial(n):
    """Return n factorial."""
    result = 1
    for i in range(2, n + 1):
        result *= i
    return result


def is_prime(n):
    """Whether n is a prime number."""
    if n < 2:
        return False
    for d in range(2, int(n ** 0.5) + 1):
        if n % d == 0:
            return False
    return True
'''
EDIT = f"Rename the function factorial to fact in this code. Reply with the whole code only.\n\n{CODE}"
STORY = "Write a long story about a dragon who learns to fly."
WORKLOADS: dict[str, tuple[str, str | None]] = {
    "edit + prediction": (EDIT, CODE),
    "edit": (EDIT, None),
    "story": (STORY, None),
}
CEILING = """
import json, sys
from mlx_lm import load, stream_generate
model, tokenizer = load(sys.argv[1])
rates = {}
for name, text in json.loads(sys.argv[2]).items():
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
    rates[name] = [list(stream_generate(model, tokenizer, prompt, max_tokens=int(sys.argv[3])))[-1].generation_tps
                   for _ in range(int(sys.argv[4]))]
print(json.dumps(rates))
"""


def one_request(base_url: str, model: str, text: str, prediction: str | None, max_tokens: int,
                ) -> tuple[float, str, dict[str, Any]]:
    """(decode tok/s, the reply, usage)."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}],
                            "max_tokens": max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    stamps: list[float] = []
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    with httpx.Client(timeout=900) as client, client.stream("POST", base_url + "/v1/chat/completions",
                                                             json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if content := (choice.get("delta") or {}).get("content"):
                    pieces.append(content)
                    stamps.append(time.perf_counter())
    tokens = usage.get("completion_tokens", len(stamps))
    rate = (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    return rate, "".join(pieces), usage


def draft_counts(base_url: str) -> tuple[float, float]:
    """The gateway's mlx_gateway_draft_tokens_total: (accepted, rejected) so far, for every model."""
    counts = {"accepted": 0.0, "rejected": 0.0}
    for line in httpx.get(base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("mlx_gateway_draft_tokens_total{"):
            for outcome in counts:
                if f'outcome="{outcome}"' in line:
                    counts[outcome] += float(line.split()[-1])
    return counts["accepted"], counts["rejected"]


def serve_and_measure(name: str, label: str, folder: Path, extra: list[str], env: dict[str, str],
                      args: argparse.Namespace, logs: Path) -> dict[str, tuple[list[float], str, dict[str, Any]]]:
    spec = server_spec(name, folder, free_port(), extra_args=extra)
    spec.env.update(env)
    server = Server(spec, int(spec.argv[spec.argv.index("--port") + 1]), logs / f"{label}.log").start()
    results = {}
    try:
        server.wait_ready(300)
        one_request(server.base_url, spec.model_id, "hello", None, 4)  # warm-up: the model loads on first use
        for workload, (text, prediction) in WORKLOADS.items():
            if prediction is not None and name != "gateway":
                continue  # mlx_lm.server has no Predicted Outputs
            rates, reply, usage = [], "", {}
            for _ in range(args.runs):
                before = draft_counts(server.base_url) if name == "gateway" else (0.0, 0.0)
                rate, reply, usage = one_request(server.base_url, spec.model_id, text, prediction, args.max_tokens)
                rates.append(rate)
                if name == "gateway":  # the last run's drafts, with or without a prediction
                    after = draft_counts(server.base_url)
                    usage["drafts"] = (int(after[0] - before[0]), int(after[1] - before[1]))
            details = usage.get("drafts", "")
            print(f"  {label} / {workload}: {', '.join(f'{r:.1f}' for r in rates)} tok/s; "
                  f"{usage.get('completion_tokens')} tokens; drafts kept, dropped: {details}", flush=True)
            results[workload] = (rates, reply, usage)
        return results
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--dtype", default=None, help="the conversion to measure (default: this machine's)")
    args = parser.parse_args()
    folder = ensure_smollm2(args.dtype)
    engine_env = cpu_blas.engine_env("auto", 0) if sys.platform == "linux" else {}
    print(f"{folder} on {cpu_model()}; the engine's BLAS: {engine_env or 'the platform default'}", flush=True)
    runs: dict[str, dict[str, tuple[list[float], str, dict[str, Any]]]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            logs = Path(tmp)
            runs["mlx_lm.server"] = serve_and_measure("mlx_lm", "mlx_lm.server", folder, [], {}, args, logs)
            if engine_env:
                runs["mlx_lm.server, engine's BLAS"] = serve_and_measure("mlx_lm", "mlx_lm.server+blas", folder, [],
                                                                         engine_env, args, logs)
            runs["gateway --draft-tokens 0"] = serve_and_measure("gateway", "gateway-0", folder,
                                                                 ["--draft-tokens", "0"], {}, args, logs)
            runs["gateway --draft-tokens 8 (default)"] = serve_and_measure("gateway", "gateway", folder,
                                                                           ["--draft-tokens", "8"], {}, args, logs)
    finally:
        stop_all()
    texts = {name: text for name, (text, _) in WORKLOADS.items() if name != "edit + prediction"}
    ceiling_run = subprocess.run([sys.executable, "-c", CEILING, str(folder), json.dumps(texts), str(args.max_tokens),
                                  str(args.runs)], capture_output=True, text=True, check=True,
                                 env={**os.environ, **engine_env})
    ceiling: dict[str, list[float]] = json.loads(ceiling_run.stdout.strip().splitlines()[-1])

    one_a_pass = runs["gateway --draft-tokens 0"]
    print(f"\ndecode tok/s, median of {args.runs}, one request at a time, greedy, {args.max_tokens} tokens max")
    print("| server | workload | tok/s | vs one a pass | same text | drafts kept / dropped |")
    print("| --- | --- | ---: | ---: | --- | --- |")
    for workload in WORKLOADS:
        base = statistics.median(one_a_pass[workload][0]) if workload in one_a_pass else None
        for server, results in runs.items():
            if workload not in results:
                continue
            rates, reply, usage = results[workload]
            median = statistics.median(rates)
            same = "yes" if reply == one_a_pass.get(workload, ([], "", {}))[1] else "no"
            drafts = "{} / {}".format(*usage["drafts"]) if "drafts" in usage else ""
            ratio = f"{median / base:.2f}" if base else ""
            print(f"| {server} | {workload} | {median:.1f} | {ratio} | {same if server.startswith('gateway') else ''}"
                  f" | {drafts} |")
        if workload in ceiling:
            print(f"| mlx-lm stream_generate, engine's BLAS (ceiling of one a pass) | {workload} | "
                  f"{statistics.median(ceiling[workload]):.1f} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
