"""Admission bounds, 429 at capacity, 503 while draining, and the drain deadline's final chunk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from gateway.app import create_asgi_app
from gateway.runtime import GatewayRuntime
from gateway.settings import Settings
from mlx_backend.client.fake import FakeEngine
from mlx_backend.registry import ModelRegistry
from tests.unit.gateway.conftest import chat_body, sse_payloads

pytestmark = pytest.mark.anyio


def runtime_for(models_dir: Path, engine: FakeEngine, **settings: object) -> GatewayRuntime:
    config = Settings(models_dirs=(models_dir,), hf_cache=False, demo_model=False, **settings)  # type: ignore[arg-type]
    return GatewayRuntime(config, engine, ModelRegistry(config.models_dirs, None, False))


async def test_requests_beyond_running_plus_queue_get_429_with_retry_after(models_dir: Path) -> None:
    engine = FakeEngine(token_delay_s=0.05)
    runtime = runtime_for(models_dir, engine, max_running=1, max_queue=1)
    await engine.start()
    transport = httpx.ASGITransport(app=create_asgi_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        results = await asyncio.gather(*[client.post("/v1/chat/completions", json=chat_body()) for _ in range(4)])
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 429, 429]
    rejected = next(r for r in results if r.status_code == 429)
    assert rejected.headers["retry-after"] and rejected.json()["error"]["type"] == "rate_limit_error"


async def test_draining_refuses_new_work_with_503_and_health_says_so(models_dir: Path) -> None:
    engine = FakeEngine()
    runtime = runtime_for(models_dir, engine)
    await engine.start()
    await runtime.admission.drain(timeout_s=1)
    transport = httpx.ASGITransport(app=create_asgi_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        response = await client.post("/v1/chat/completions", json=chat_body())
        health = await client.get("/health")
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert health.status_code == 503 and health.json()["status"] == "draining"


async def test_drain_deadline_ends_streams_with_a_final_chunk_and_done(models_dir: Path) -> None:
    engine = FakeEngine(token_delay_s=0.2, reply=lambda _: " ".join(["word"] * 100))
    runtime = runtime_for(models_dir, engine)
    await engine.start()
    transport = httpx.ASGITransport(app=create_asgi_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        stream = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(stream=True)))
        await asyncio.sleep(0.5)
        await runtime.admission.drain(timeout_s=0.3)
        response = await asyncio.wait_for(stream, 5)
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert runtime.health.report().requests_running == 0


async def test_drain_deadline_ends_responses_and_messages_streams_cleanly_and_refuses_counts(models_dir: Path) -> None:
    from tests.support.event_order import check_anthropic_events, check_responses_events, named_events

    engine = FakeEngine(token_delay_s=0.2, reply=lambda _: " ".join(["word"] * 100))
    runtime = runtime_for(models_dir, engine)
    await engine.start()
    transport = httpx.ASGITransport(app=create_asgi_app(runtime))
    ask = [{"role": "user", "content": "hi"}]
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        responses = asyncio.create_task(client.post("/v1/responses", json={"model": "tiny", "input": "hi",
                                                                          "stream": True}))
        messages = asyncio.create_task(client.post("/v1/messages", json={"model": "tiny", "max_tokens": 500,
                                                                        "messages": ask, "stream": True}))
        await asyncio.sleep(0.5)
        await runtime.admission.drain(timeout_s=0.3)
        final = check_responses_events(named_events((await asyncio.wait_for(responses, 5)).text))
        message = check_anthropic_events(named_events((await asyncio.wait_for(messages, 5)).text))
        count = await client.post("/v1/messages/count_tokens", json={"model": "tiny", "messages": ask})
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert message["stop_reason"] == "max_tokens"
    assert count.status_code == 503 and count.json()["error"]["type"] == "overloaded_error"
    assert runtime.health.report().requests_running == 0
