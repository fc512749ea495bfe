"""What a streamed chat completion writes, write by write (gateway/serving/generation.py `_stream`).

The app is driven with raw ASGI messages, so each `http.response.body` message the server would write is
seen on its own: one event per token while the client keeps up, several deltas in one event when it fell
behind, and the end of a stream (the last closing chunk, the usage chunk, `[DONE]`) in one write. The
bytes a client reads, joined, follow OpenAI's chunk invariants whatever the write boundaries.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from gateway.app import create_asgi_app
from gateway.runtime import GatewayRuntime
from gateway.settings import Settings
from mlx_backend.client.fake import FakeEngine
from mlx_backend.registry import ModelRegistry
from tests.unit.gateway.conftest import sse_payloads

REPLY = "one two three four five six"


def writes_of(models_dir: Path, body: dict[str, Any], engine: FakeEngine, *, slow_send_s: float = 0.0,
              **settings: Any) -> list[bytes]:
    """The body of each write of one POST /v1/chat/completions, in order (empty writes left out)."""

    async def run() -> list[bytes]:
        config = Settings(models_dirs=(models_dir,), hf_cache=False, demo_model=False, **settings)
        runtime = GatewayRuntime(config, engine, ModelRegistry(config.models_dirs, None, False))
        app = create_asgi_app(runtime)
        await engine.start()
        payload = json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
                 "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(payload)).encode())],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 11435)}
        pending = [{"type": "http.request", "body": payload, "more_body": False}]
        over = asyncio.Event()
        writes: list[bytes] = []

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            await over.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] != "http.response.body":
                assert message["status"] == 200
                return
            if message.get("body"):
                writes.append(message["body"])
            if not message.get("more_body", False):
                over.set()
            elif slow_send_s:
                await asyncio.sleep(slow_send_s)  # a client reading slowly: the write is pending this long

        try:
            await asyncio.wait_for(app(scope, receive, send), 10)
        finally:
            await engine.stop()
        return writes

    return asyncio.run(run())


def body(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}, **overrides}


def content_of(write: bytes) -> str:
    return "".join(p["choices"][0]["delta"].get("content") or "" for p in sse_payloads(write.decode())
                   if isinstance(p, dict) and p.get("choices"))


def test_a_client_that_keeps_up_gets_one_event_per_token_and_the_end_in_one_write(models_dir: Path) -> None:
    writes = writes_of(models_dir, body(), FakeEngine(reply=lambda _: REPLY, token_delay_s=0.01))
    opening, *tokens, last = writes
    assert sse_payloads(opening.decode())[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [len(sse_payloads(w.decode())) for w in tokens] == [1] * len(tokens)
    assert "".join(content_of(w) for w in tokens) == REPLY
    closing, usage, done = sse_payloads(last.decode())
    assert closing["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(REPLY.split())
    assert done == "[DONE]"


def test_without_include_usage_the_last_write_is_the_closing_chunk_and_done(models_dir: Path) -> None:
    writes = writes_of(models_dir, body(stream_options=None), FakeEngine(reply=lambda _: REPLY))
    closing, done = sse_payloads(writes[-1].decode())
    assert closing["choices"][0]["finish_reason"] == "stop" and done == "[DONE]"


def test_a_client_behind_gets_the_deltas_that_waited_in_one_event(models_dir: Path) -> None:
    # Every write takes 50 ms while a token comes every 5 ms: the tokens that arrive meanwhile are one event.
    writes = writes_of(models_dir, body(), FakeEngine(reply=lambda _: REPLY, token_delay_s=0.005),
                       slow_send_s=0.05)
    events = [p for w in writes for p in sse_payloads(w.decode())]
    texts = [e for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")]
    assert len(texts) < len(REPLY.split())  # merged
    assert "".join(e["choices"][0]["delta"]["content"] for e in texts) == REPLY  # nothing lost, in order
    assert all(len(sse_payloads(w.decode())) == 1 for w in writes[:-1])  # still one event per write
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == len(REPLY.split())


def test_an_error_mid_stream_and_done_go_out_in_one_write(models_dir: Path) -> None:
    writes = writes_of(models_dir, body(), FakeEngine(reply=lambda _: REPLY, token_delay_s=0.4),
                       request_timeout_s=1.0)  # the timeout ends it after two or so of its six tokens
    error, done = sse_payloads(writes[-1].decode())
    assert error["error"]["type"] and "timeout" in error["error"]["message"] and done == "[DONE]"
