"""SIGTERM/SIGINT: refuse new work at once, finish what fits, end the rest cleanly, exit 0, leave nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.conftest import StartServer
from tests.support.server import ServerProcess
from tests.support.tiny_models import NEVER_STOP

DEADLINE_S = 20.0


async def _stream(client: httpx.AsyncClient, max_tokens: int) -> tuple[list[str], float]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
            "stream": True, "user": "fault:slow", "logit_bias": NEVER_STOP}
    lines: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                lines.append(line)
    return lines, time.monotonic()


def _finish_reason(lines: list[str]) -> str | None:
    import json

    for line in reversed(lines):
        if line != "data: [DONE]":
            choices = json.loads(line[len("data: "):]).get("choices") or []
            if choices and choices[0].get("finish_reason"):
                return str(choices[0]["finish_reason"])
    return None


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_sigterm_with_8_streams_in_flight(start_server: StartServer, models_dir: Path, signum: int) -> None:
    server = start_server("--models-dir", str(models_dir), "--test-faults", "--drain-timeout-s", str(DEADLINE_S))
    server.wait_ready()
    processes = [psutil.Process(server.proc.pid), *server.descendants()]  # type: ignore[union-attr]

    async def scenario() -> tuple[list[tuple[list[str], float]], float, float]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            # 'fault:slow' paces tokens at ~20/s: 4 short streams fit the deadline, 4 long ones cannot.
            tasks = [asyncio.create_task(_stream(client, n)) for n in (20, 20, 40, 40, 240, 240, 240, 240)]
            await asyncio.sleep(1.0)
            signalled_at = time.monotonic()
            server.signal(signum)
            await asyncio.sleep(0.2)
            refused_in = await _refusal_latency(server)
            results = await asyncio.gather(*tasks)
            return results, signalled_at, refused_in

    results, signalled_at, refused_in = asyncio.run(scenario())
    assert refused_in < 0.5
    for lines, ended_at in results:
        assert lines[-1] == "data: [DONE]"
        assert _finish_reason(lines) in ("stop", "length")
        assert ended_at - signalled_at < DEADLINE_S + 1
    assert sum(1 for lines, at in results if at - signalled_at < DEADLINE_S - 1) >= 4  # the short ones finished
    code = server.wait_exit(timeout_s=DEADLINE_S + 2 - (time.monotonic() - signalled_at) + 1)
    assert code == 0
    log = server.log()
    for step in ("draining", "stopping the HTTP server", "engine", "shutdown: complete"):
        assert step in log
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def _refusal_latency(server: ServerProcess) -> float:
    start = time.monotonic()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=2) as client:
            response = await client.post("/v1/chat/completions",
                                         json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
            assert response.status_code == 503 and response.headers["retry-after"]
    except httpx.ConnectError:
        pass  # refusing the connection is also a refusal
    return time.monotonic() - start


def test_sigint_drains_too_and_a_second_signal_exits_at_once(start_server: StartServer, models_dir: Path) -> None:
    server = start_server("--models-dir", str(models_dir), "--test-faults", "--drain-timeout-s", "30")
    server.wait_ready()
    engine = psutil.Process(server.engine_pid())

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            task = asyncio.create_task(_stream(client, 240))
            await asyncio.sleep(1.0)
            server.signal(signal.SIGINT)
            await asyncio.sleep(0.5)
            assert (await client.get("/health")).json()["status"] == "draining"
            server.signal(signal.SIGINT)
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert server.wait_exit(timeout_s=3) != 0  # the second signal skips the drain: not a clean exit
    psutil.wait_procs([engine], timeout=3)
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE


def test_idle_server_stops_within_a_second_and_leaves_no_process(start_server: StartServer, models_dir: Path) -> None:
    server = start_server("--models-dir", str(models_dir))
    server.wait_ready()
    children = server.descendants()
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout_s=10) == 0
    assert time.monotonic() - started < 5
    _gone, alive = psutil.wait_procs(children, timeout=2)
    assert not alive
