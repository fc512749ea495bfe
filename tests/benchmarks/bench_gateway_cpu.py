"""The gateway's own CPU per token, without Granian: the real ASGI app driven in-process by ASGI messages,
the real engine client and IPC, and the paced stand-in engine (tests/support/paced_worker.py) as a real
process. What this process spends is ours (asyncio, Litestar, the exchange, routing, SSE encoding); what
`bench_stream_path.py` measures on top of it is Granian's and the loopback TCP's.

    python tests/benchmarks/bench_gateway_cpu.py [--concurrency 1,32,64] [--tokens 256] [--step-ms 2]
        [--modes stream,whole] [--repeats 3] [--profile out.pstats]

Prints, per concurrency and mode, the median over repeats of this process's CPU microseconds per token
(`time.process_time`) and the wall milliseconds per token.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.app import create_asgi_app
from gateway.health.engine_events import MetricsObserver
from gateway.runtime import GatewayRuntime
from gateway.settings import Settings
from mlx_backend.client.engine import EngineClient
from mlx_backend.contract import EngineConfig
from mlx_backend.registry import ModelRegistry

MODEL = "mlx-gateway-demo"


def runtime(max_running: int) -> GatewayRuntime:
    settings = Settings(max_running=max_running, max_queue=256, prompt_cache_gb=0, hf_cache=False,
                        log_level="warning")
    observer = MetricsObserver()
    engine = EngineClient(EngineConfig(max_running=max_running, prompt_cache_bytes=0), observer,
                          worker_module="tests.support.paced_worker")
    return GatewayRuntime(settings, engine, ModelRegistry([], None, True), observer)


async def one(app: Any, stream: bool, tokens: int, index: int) -> int:
    body = json.dumps({"model": MODEL, "max_tokens": tokens, "temperature": 0, "stream": stream,
                       "messages": [{"role": "user", "content": f"request {index}"}]}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:11435"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 11435)}
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    finished = asyncio.Event()
    received = 0

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await finished.wait()  # as a server says once the response is out: the exchange is over
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal received
        if message["type"] == "http.response.body":
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    await app(scope, receive, send)
    return received


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rt = runtime(max(args.concurrency))
    app = create_asgi_app(rt)
    await rt.engine.start()
    assert await rt.engine.wait_until_up(30), "the paced engine did not come up"  # type: ignore[attr-defined]
    rows = []
    profiler = cProfile.Profile() if args.profile else None
    try:
        await one(app, True, 8, -1)
        await one(app, False, 8, -1)
        index = 0
        for concurrency in args.concurrency:
            for mode in args.modes:
                cpu, wall = [], []
                for _ in range(args.repeats):
                    started_cpu, started = time.process_time(), time.perf_counter()
                    if profiler:
                        profiler.enable()
                    await asyncio.gather(*(one(app, mode == "stream", args.tokens, index + i)
                                           for i in range(concurrency)))
                    if profiler:
                        profiler.disable()
                    index += concurrency
                    tokens = concurrency * args.tokens
                    cpu.append((time.process_time() - started_cpu) * 1e6 / tokens)
                    wall.append((time.perf_counter() - started) * 1e3 / args.tokens)
                rows.append({"concurrency": concurrency, "mode": mode, "cpu_us_per_token": statistics.median(cpu),
                             "cpu_all": cpu, "wall_ms_per_token": statistics.median(wall)})
                print(f"c={concurrency:<3} {mode:<6} {statistics.median(cpu):7.1f} µs CPU/token "
                      f"(runs {', '.join(f'{c:.1f}' for c in cpu)}), {statistics.median(wall):.3f} ms/token",
                      flush=True)
    finally:
        await rt.engine.stop()
        if profiler:
            profiler.dump_stats(args.profile)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,32,64")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=2.0)
    parser.add_argument("--modes", default="stream,whole")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", default="step", help="the paced engine's: step or event")
    parser.add_argument("--profile", help="write a cProfile of the measured runs here")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.modes = args.modes.split(",")
    os.environ.update(PACED_STEP_MS=str(args.step_ms), PACED_FRAMES=args.frames,
                      PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    print(f"paced engine: {args.step_ms} ms a step, frames per {args.frames}; {args.tokens} tokens a request; "
          f"load average {os.getloadavg()[0]:.2f}")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
