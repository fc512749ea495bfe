"""A prompt whose prefill takes longer than the stall limit completes with the engine it started on: the engine
sizes its prefill pieces to the device's speed (mlx_backend/engine/pacing.py), so the stall clock sees progress
several times a second. The opposite, a truly stuck engine being killed, is test_engine_faults.py's
`test_injected_stall_is_reported_as_stalled_and_the_engine_is_replaced`, on the same 2 s limit.

Before pacing, progress moved once per 2048-token piece: the prompt here is one such piece, whose prefill alone
takes longer than the kill threshold (1.5 x the stall limit) on this CPU.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import StartServer
from tests.support.server import ServerProcess
from tests.support.tiny_models import make_tiny_model

STALL_LIMIT_S = 2.0
KILL_AFTER_S = STALL_LIMIT_S * 1.5  # mlx_backend/client/engine.py kills at limit + max(1, limit / 2)
PROMPT_WORDS = 2000  # one token each (the word-level tokenizer): under one 2048-token piece


@pytest.fixture(scope="module")
def slow_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model wide enough that 2000 tokens take seconds to prefill on a CPU, with room for them."""
    root = tmp_path_factory.mktemp("slow-models")
    make_tiny_model(root / "wide", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=768, context_length=4096, dtype="float32")
    return root


@pytest.fixture
def server(start_server: StartServer, slow_models_dir: Path) -> ServerProcess:
    # MLX's reference BLAS: the prefill must outlast the stall limit on this CPU, and OpenBLAS (the default where
    # installed, mlx_backend/cpu_blas.py) does these 2000 tokens in about a second.
    server = start_server("--models-dir", str(slow_models_dir), "--stall-timeout-s", str(STALL_LIMIT_S),
                          "--cpu-blas", "off")
    server.wait_ready()
    # Loaded and started before the test times anything: a short prompt, fully prefilled in one small piece.
    short = {"model": "wide", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
    assert httpx.post(server.base_url + "/v1/chat/completions", json=short, timeout=120).status_code == 200
    return server


class HealthWatch:
    """Every /health status seen while a request runs, polled from a thread of its own."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.seen: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                self.seen.append(str(self.server.health().json()["status"]))
            except httpx.HTTPError as exc:
                self.seen.append(f"unreachable ({exc})")
            self._done.wait(0.1)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


def test_a_prefill_longer_than_the_stall_limit_completes_without_an_engine_restart(server: ServerProcess) -> None:
    engine_pid = server.engine_pid()
    prompt = " ".join(["hello", "world", "python", "code"] * (PROMPT_WORDS // 4))
    body = {"model": "wide", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
    with HealthWatch(server) as health:
        started = time.monotonic()
        response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=600)
        took = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] >= PROMPT_WORDS
    # The proof needs a prefill that outlasts the kill threshold: otherwise the prompt is too short here.
    assert took > KILL_AFTER_S, f"the request took only {took:.1f}s: make the prompt longer for this machine"
    print(f"prefill of {response.json()['usage']['prompt_tokens']} tokens took {took:.1f}s")
    assert server.engine_pid() == engine_pid
    assert "stalled" not in health.seen and all(s in {"ok", "degraded"} for s in health.seen), set(health.seen)
    restarts = server.health().json()["engine"]["restarts"]
    assert restarts == 0
    assert "stalled" not in server.log()
