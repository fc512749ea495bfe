"""Agent-shaped benchmark: a long system prompt (a coding agent's rules and tools), a conversation that grows
over several turns, then several agents sharing one system prompt at once; mlx-gateway beside mlx_lm.server
on the same model, one after the other, in one run.

    # GPU, the Llama-3.2-1B shape (context 32k), 12k-token system prompt (tests/benchmarks/gpu_session.sh agent)
    python tests/benchmarks/bench_agent.py --shape llama-3.2-1b-agent --out /tmp/agent.md
    # CPU, a small shape and a shorter system prompt (a 12k prefill of even the demo model takes minutes here)
    python tests/benchmarks/bench_agent.py --shape agent-tiny --system-tokens 2000 --turn-tokens 100

Per turn: TTFT, prompt tokens, cached tokens (usage.prompt_tokens_details.cached_tokens, as each server reports
it), tok/s over the whole request. The shared phase uses a system prompt neither server has seen (a second
agent's), sent by every agent at the same moment with its own first message: "prefilled" is the sum over
agents of prompt minus cached tokens, against once (system prompt once + each agent's own part) and the naive
total (all of it each).
Random weights and a word-level tokenizer (one token a word): the text is vocabulary words; only lengths matter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_model, loads, make_prompt
from bench_models import DEFAULT_MODEL_DIR, SHAPES, ensure_model
from bench_servers import Server, free_port, server_spec, stop_all


@dataclass
class Turn:
    phase: str  # "turn N" or "agent N"
    ttft_s: float | None
    total_s: float
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    content: str = ""
    error: str = ""

    @property
    def tok_s(self) -> float | None:
        """Completion tokens over the request's whole time, prefill included. (Random weights often decode to
        text that arrives in a few late chunks, so tokens after the first chunk would mislead.)"""
        return self.completion_tokens / self.total_s if self.completion_tokens and self.total_s > 0 else None


def vocabulary(model: Path) -> list[str]:
    """Plain words of the model's word-level vocabulary (no special or synthetic tokens)."""
    vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    return [w for w in vocab if w.isalpha() and w.islower() and not w.startswith("w")]


async def chat(client: httpx.AsyncClient, url: str, model_id: str, messages: list[dict[str, str]],
               max_tokens: int, phase: str) -> Turn:
    body = {"model": model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread())[:300].decode(errors="replace")
                return Turn(phase, None, time.perf_counter() - started, None, None, None,
                            error=f"{response.status_code} {text}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = loads(line[5:].strip())
                for choice in chunk.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        ttft = ttft if ttft is not None else time.perf_counter() - started
                        parts.append(content)
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as exc:
        return Turn(phase, ttft, time.perf_counter() - started, None, None, None, error=repr(exc))
    details = usage.get("prompt_tokens_details") or {}
    return Turn(phase, ttft, time.perf_counter() - started, usage.get("prompt_tokens"),
                details.get("cached_tokens"), usage.get("completion_tokens"), "".join(parts))


async def scenario(base_url: str, model_id: str, words: list[str], args: argparse.Namespace) -> list[Turn]:
    url = base_url + "/v1/chat/completions"
    turns: list[Turn] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=10)) as client:
        # One agent's conversation: the same system prompt, a history that grows by a turn each time.
        messages = [{"role": "system", "content": make_prompt(words, args.system_tokens, 1)}]
        for n in range(1, args.turns + 1):
            messages.append({"role": "user", "content": make_prompt(words, args.turn_tokens, 100 + n)})
            turn = await chat(client, url, model_id, messages, args.max_tokens, f"turn {n}")
            turns.append(turn)
            log(f"  {turn.phase}: ttft {fmt(turn.ttft_s)} s, prompt {turn.prompt_tokens}, cached {turn.cached_tokens}"
                f"{', ' + turn.error if turn.error else ''}")
            messages.append({"role": "assistant", "content": turn.content or "ok"})
        # Agents that share a system prompt nobody has sent yet, all at the same moment.
        system = {"role": "system", "content": make_prompt(words, args.system_tokens, 2)}
        agents = [chat(client, url, model_id,
                       [system, {"role": "user", "content": make_prompt(words, args.turn_tokens, 200 + a)}],
                       args.max_tokens, f"agent {a + 1}") for a in range(args.agents)]
        started = time.perf_counter()
        shared = await asyncio.gather(*agents)
        wall = time.perf_counter() - started
        for turn in shared:
            log(f"  {turn.phase}: ttft {fmt(turn.ttft_s)} s, prompt {turn.prompt_tokens}, cached {turn.cached_tokens}"
                f"{', ' + turn.error if turn.error else ''}")
        turns.extend(shared)
        turns.append(Turn("agents (wall)", None, wall, None, None,
                          sum(t.completion_tokens or 0 for t in shared)))
    return turns


def run_server(name: str, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    extra = args.gateway_args.split() if name == "gateway" else args.mlx_lm_args.split()
    spec = server_spec(name, model, port, extra_args=extra)
    server = Server(spec, port, args.work_dir / f"agent-{name}.log")
    log(f"{name}: starting")
    server.start()
    try:
        server.wait_ready(args.startup_timeout)
        words = vocabulary(model)
        # Warm-up: loads the model and pays the first compilation; shares nothing with the scenario.
        warm = asyncio.run(warm_up(server.base_url, spec.model_id, words, args))
        log(f"{name}: ready, warm-up {warm.total_s:.1f}s {warm.error}")
        turns = asyncio.run(scenario(server.base_url, spec.model_id, words, args))
        return {"server": name, "turns": [asdict(t) | {"tok_s": t.tok_s} for t in turns]}
    finally:
        server.stop()


async def warm_up(base_url: str, model_id: str, words: list[str], args: argparse.Namespace) -> Turn:
    deadline = time.monotonic() + args.startup_timeout
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=10)) as client:
        while True:
            turn = await chat(client, base_url + "/v1/chat/completions", model_id,
                              [{"role": "user", "content": make_prompt(words, 64, 0)}], 4, "warm-up")
            if not turn.error or time.monotonic() > deadline:
                return turn
            await asyncio.sleep(1)


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["| server | phase | TTFT s | prompt tok | cached tok | tok/s (end to end) |", "|---|---|---|---|---|---|"]
    for result in results:
        for t in result["turns"]:
            if t["phase"] == "agents (wall)":
                continue
            lines.append(f"| {result['server']} | {t['phase']} | {fmt(t['ttft_s'])} | {t['prompt_tokens'] or '-'} | "
                         f"{t['cached_tokens'] if t['cached_tokens'] is not None else '-'} | "
                         f"{fmt(t['tok_s'], 1)} |{' ' + t['error'][:80] if t['error'] else ''}")
    lines += ["", "| server | later turns: max TTFT s | agents: prefilled tok (once / naive) | agents: max TTFT s "
              "| agents: tok/s |", "|---|---|---|---|---|"]
    for result in results:
        conv = [t for t in result["turns"] if t["phase"].startswith("turn ")]
        agents = [t for t in result["turns"] if t["phase"].startswith("agent ")]
        wall = next(t for t in result["turns"] if t["phase"] == "agents (wall)")
        later = [t["ttft_s"] for t in conv[1:] if t["ttft_s"] is not None]
        prompts = [t["prompt_tokens"] or 0 for t in agents]
        prefilled = sum((t["prompt_tokens"] or 0) - (t["cached_tokens"] or 0) for t in agents)
        own = [p - args.system_tokens for p in prompts]  # each agent's own part, roughly (template tokens in it)
        once = args.system_tokens + sum(own)
        ttfts = [t["ttft_s"] for t in agents if t["ttft_s"] is not None]
        lines.append(f"| {result['server']} | {fmt(max(later) if later else None)} | {prefilled} ({once} / "
                     f"{sum(prompts)}) | {fmt(max(ttfts) if ttfts else None)} | "
                     f"{fmt((wall['completion_tokens'] or 0) / wall['total_s'], 1)} |")
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="agent-tiny", choices=sorted(SHAPES))
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--servers", default="gateway,mlx_lm")
    parser.add_argument("--system-tokens", type=int, default=12_000)
    parser.add_argument("--turn-tokens", type=int, default=300, help="each user message (and agent's first)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--gateway-args", default="", help="extra `mlx-gateway serve` arguments")
    parser.add_argument("--mlx-lm-args", default="", help="extra `mlx_lm.server` arguments")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--request-timeout", type=float, default=900)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mlx-gateway-bench/agent"))
    parser.add_argument("--out", type=Path, help="write the tables (markdown) and the raw JSON beside it")
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = ensure_model(args.shape, args.model_dir)
    results = []
    try:
        for name in args.servers.split(","):
            results.append(run_server(name, model, args))
    finally:
        stop_all()
    header = (f"agent benchmark: shape {args.shape}, system prompt {args.system_tokens} tokens, {args.turns} turns "
              f"of +{args.turn_tokens} tokens, {args.agents} agents at once, {args.max_tokens} tokens each; "
              f"{cpu_model()}")
    text = header + "\n\n" + table(results, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out),
                                                             "model_dir": str(args.model_dir),
                                                             "work_dir": str(args.work_dir)},
                                                             "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
