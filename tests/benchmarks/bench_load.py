"""Streaming load on an OpenAI-compatible server, and a /health prober that runs in its own process.

Load: `concurrency` clients on one httpx.AsyncClient, each sending `requests_per_client` streaming
chat completions in turn; SSE is parsed here (lighter than the openai SDK at 64-256 clients). Every
request and the whole level are bounded in time: a hung server is reported, never waited on forever.
One Python process parses about 3000 SSE events a second (measured on an H100 host, 2026-11-25: one
process at 64 clients read 3098 tok/s from the gateway, four processes of 16 read 5646), so past a few
tens of clients the clients are split over several processes (`run_level_in_processes`).

Prober (`python bench_load.py probe --url ... --out ...`): GETs the URL every `--interval-ms` on one
keep-alive connection and records each latency. A separate process, so the load generator's busy
event loop does not add its own delay to the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bench_common import loads, msgspec_error, percentile


@dataclass
class RequestResult:
    outcome: str  # ok | rate_limited | failed
    reason: str = ""  # for failures: http_503, reset, no_done, stream_error, timeout, ...
    ttft_s: float | None = None
    latency_s: float = 0.0
    tokens: int = 0  # completion tokens: from usage if sent, else content chunks
    tokens_from_usage: bool = False
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    retry_after: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests_per_client: int
    wall_s: float = 0.0
    timed_out: bool = False
    results: list[RequestResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.outcome == "ok"]
        failed = [r for r in self.results if r.outcome == "failed"]
        limited = [r for r in self.results if r.outcome == "rate_limited"]
        tokens = sum(r.tokens for r in ok)
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        return {
            "concurrency": self.concurrency,
            "requests_per_client": self.requests_per_client,
            "requests": len(self.results),
            "ok": len(ok),
            "failed": len(failed),
            "rate_limited": len(limited),
            "failure_reasons": dict(Counter(r.reason for r in failed)),
            "rate_limited_with_retry_after": sum(1 for r in limited if r.retry_after),
            "wall_s": self.wall_s,
            "timed_out": self.timed_out,
            "tokens": tokens,
            "tok_s": tokens / self.wall_s if self.wall_s > 0 else 0.0,
            "tokens_per_ok_request": tokens / len(ok) if ok else None,
            "min_tokens": min((r.tokens for r in ok), default=None),
            "max_tokens": max((r.tokens for r in ok), default=None),
            "tokens_from_usage": all(r.tokens_from_usage for r in ok) if ok else None,
            "prompt_tokens": ok[0].prompt_tokens if ok else None,
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p95_s": percentile(ttfts, 95),
            "ttft_max_s": max(ttfts, default=None),
            "latency_p50_s": percentile([r.latency_s for r in ok], 50),
        }


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    started = time.perf_counter()
    result = RequestResult(outcome="failed")
    content_chunks = 0
    done = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code == 429:
                await response.aread()
                return RequestResult(
                    outcome="rate_limited",
                    latency_s=time.perf_counter() - started,
                    retry_after=response.headers.get("retry-after"),
                )
            if response.status_code != 200:
                text = (await response.aread())[:300].decode(errors="replace")
                return RequestResult(
                    outcome="failed",
                    reason=f"http_{response.status_code}: {text}",
                    latency_s=time.perf_counter() - started,
                )
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and ": keepalive" comments
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                chunk = loads(payload)
                if "error" in chunk:
                    result.reason = "stream_error"
                    break
                for choice in chunk.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        content_chunks += 1
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - started
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    result.tokens = int(usage.get("completion_tokens", 0))
                    result.tokens_from_usage = True
                    result.prompt_tokens = usage.get("prompt_tokens")
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        result.reason = f"reset ({type(exc).__name__})"
    except httpx.ConnectError:
        result.reason = "connect_error"
    except httpx.TimeoutException as exc:
        result.reason = f"timeout ({type(exc).__name__})"
    except httpx.HTTPError as exc:
        result.reason = f"http_error ({type(exc).__name__})"
    except (ValueError, msgspec_error) as exc:
        result.reason = f"bad_json ({exc})"
    result.latency_s = time.perf_counter() - started
    if not result.tokens_from_usage:
        result.tokens = content_chunks
    if done and not result.reason:
        result.outcome = "ok"
    elif not result.reason:
        result.reason = "no_done"  # the stream ended without [DONE]: cut off
    return result


async def run_level(
    base_url: str,
    body: dict[str, Any],
    prompts: list[str],
    concurrency: int,
    requests_per_client: int,
    level_timeout_s: float,
    read_timeout_s: float,
) -> LevelResult:
    """`concurrency` clients x `requests_per_client` streaming requests; client c's k-th request uses
    prompts[k * concurrency + c]."""
    level = LevelResult(concurrency, requests_per_client)
    url = base_url + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(connect=10.0, read=read_timeout_s, write=10.0, pool=level_timeout_s)

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        for k in range(requests_per_client):
            prompt = prompts[(k * concurrency + index) % len(prompts)]
            request = {**body, "messages": [{"role": "user", "content": prompt}]}
            level.results.append(await one_request(client, url, request))

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        tasks = [asyncio.create_task(client_loop(i, client)) for i in range(concurrency)]
        try:
            _done, pending = await asyncio.wait(tasks, timeout=level_timeout_s)
            level.wall_s = time.perf_counter() - started
            level.timed_out = bool(pending)
        finally:  # on timeout or interrupt: no client task outlives the shared client
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    unanswered = concurrency * requests_per_client - len(level.results)
    level.results.extend(RequestResult(outcome="failed", reason="level_timeout") for _ in range(unanswered))
    return level


def client_processes_for(concurrency: int, clients_per_process: int, max_processes: int) -> int:
    return max(1, min(max_processes, -(-concurrency // max(1, clients_per_process))))


def run_level_in_processes(
    base_url: str,
    body: dict[str, Any],
    prompts: list[str],
    concurrency: int,
    requests_per_client: int,
    level_timeout_s: float,
    read_timeout_s: float,
    processes: int,
) -> LevelResult:
    """`run_level` with the clients dealt over `processes` processes that start together; the level's wall
    time runs from that start to the last process's end."""
    if processes <= 1:
        return asyncio.run(run_level(base_url, body, prompts, concurrency, requests_per_client,
                                     level_timeout_s, read_timeout_s))
    shares = [list(range(concurrency))[j::processes] for j in range(processes)]
    shares = [share for share in shares if share]
    start_at = time.time() + 0.5 + 0.05 * len(shares)  # every process is up and waiting by then
    jobs = []
    for share in shares:
        # Client i of this share is client share[i] of the level: it sends the prompts that one would.
        own = [prompts[(k * concurrency + c) % len(prompts)] for k in range(requests_per_client) for c in share]
        jobs.append((start_at, base_url, body, own, len(share), requests_per_client, level_timeout_s,
                     read_timeout_s))
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        parts = pool.starmap(_run_share, jobs)
    level = LevelResult(concurrency, requests_per_client)
    for part in parts:
        level.results.extend(part.results)
        level.timed_out |= part.timed_out
    level.wall_s = max(part.wall_s for part in parts)
    return level


def _run_share(start_at: float, *args: Any) -> LevelResult:
    time.sleep(max(0.0, start_at - time.time()))
    level = asyncio.run(run_level(*args))
    level.wall_s = time.time() - start_at
    return level


# --- the /health prober (its own process) ---------------------------------------------------------


def probe_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_load.py probe")
    parser.add_argument("--url", required=True)
    parser.add_argument("--interval-ms", type=float, default=75.0)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, help="touched once the first probe has been answered")
    args = parser.parse_args(argv)

    stopping = False

    def on_signal(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started = time.monotonic()
    with httpx.Client(timeout=args.timeout_s) as client:
        while not stopping and time.monotonic() - started < args.max_seconds:
            sent = time.perf_counter()
            try:
                response = client.get(args.url)
                elapsed = time.perf_counter() - sent
                if response.status_code == 200:
                    latencies.append(elapsed)
                else:
                    errors[f"http_{response.status_code}"] += 1
            except httpx.HTTPError as exc:
                elapsed = time.perf_counter() - sent
                errors[type(exc).__name__] += 1
                latencies.append(elapsed)  # a timeout is a latency too, at least this long
            if args.ready_file and not args.ready_file.exists():
                args.ready_file.touch()
            time.sleep(max(0.0, args.interval_ms / 1000 - elapsed))
    args.out.write_text(json.dumps({"latencies_s": latencies, "errors": dict(errors)}))
    return 0


def summarize_probe(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"count": 0, "errors": {"no_probe_output": 1}}
    lat = data["latencies_s"]
    return {
        "count": len(lat),
        "errors": data["errors"],
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "max_s": max(lat, default=None),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["probe"]:
        return probe_main(argv[1:])
    parser = argparse.ArgumentParser(description="one streaming load level against a running server")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--level-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    body = {
        "model": args.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }
    prompts = [f"w{i} hello there" for i in range(args.concurrency * args.requests_per_client)]
    level = asyncio.run(
        run_level(
            args.base_url,
            body,
            prompts,
            args.concurrency,
            args.requests_per_client,
            args.level_timeout,
            120.0,
        )
    )
    print(json.dumps(level.summary(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
