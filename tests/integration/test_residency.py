"""Models that come and go, on a real server with a real engine: idle unload with per-model keep-alive, the
admin API and `mlx-gateway models`, pins, the allow-list, preloads that never block the start, load progress,
and a memory budget that counts the KV cache."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import StartServer
from tests.support import tiny_models as tm
from tests.support.server import ServerProcess

pytestmark = pytest.mark.slow

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def chat(model: str, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def until(check: Callable[[], Any], timeout_s: float = 20, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout_s}s")


def model(server: ServerProcess, model_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/v1/models/{model_id}", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def admin(server: ServerProcess, action: str, model_id: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}/admin/models/{action}", json={"model": model_id},
                      headers=kwargs.pop("headers", AUTH), timeout=60, **kwargs)


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


@pytest.fixture(scope="module")
def residency_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("residency-models")
    tm.make_tiny_model(root / "tiny")
    tm.make_tiny_model(root / "org" / "keeper", seed=1)
    tm.mismatch_shapes(tm.make_tiny_model(root / "broken", seed=2))
    tm.make_tiny_model(root / "hidden", seed=3)
    return root


@pytest.fixture(scope="module")
def keyed(residency_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Keep-alive 2 s, but org/* forever; an API key; test faults for slow streams."""
    log = tmp_path_factory.mktemp("logs") / "keyed.log"
    server = ServerProcess(["--models-dir", str(residency_models), "--api-key", KEY, "--keep-alive-s", "2",
                            "--model-keep-alive", "org/*=-1", "--test-faults"], log).start()
    server.wait_ready()
    yield server
    server.stop()


def test_an_unused_model_unloads_after_its_keep_alive_and_frees_its_memory(keyed: ServerProcess) -> None:
    unloads_before = metric(keyed, 'mlx_gateway_model_unloads_total{reason="idle"}')
    for model_id in ("tiny", "org/keeper"):
        assert httpx.post(f"{keyed.base_url}/v1/chat/completions", json=chat(model_id), headers=AUTH,
                          timeout=60).status_code == 200
    tiny = model(keyed, "tiny")
    assert tiny["status"] == "loaded" and tiny["keep_alive_s"] == 2
    assert tiny["expires_at"] == pytest.approx(tiny["last_used_at"] + 2, abs=0.01)
    assert model(keyed, "org/keeper")["expires_at"] is None  # -1: kept
    loaded_memory = keyed.health().json()["memory"]["active_bytes"]

    until(lambda: model(keyed, "tiny")["status"] == "available", 15, "tiny's idle unload")
    health = keyed.health().json()
    assert [m["id"] for m in health["models"]] == ["org/keeper"]
    assert health["models_loaded"] == 1
    assert health["memory"]["active_bytes"] < loaded_memory  # the arrays went, not just the table entry
    assert metric(keyed, 'mlx_gateway_model_unloads_total{reason="idle"}') == unloads_before + 1
    assert re.search(r"unloaded model tiny \(idle\); MLX memory now", keyed.log())
    time.sleep(2.5)
    assert model(keyed, "org/keeper")["status"] == "loaded"


def test_the_admin_api_loads_pins_unpins_and_unloads(keyed: ServerProcess) -> None:
    assert admin(keyed, "load", "tiny", headers={}).status_code == 401
    loaded = admin(keyed, "load", "tiny")
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
    pinned = admin(keyed, "pin", "tiny").json()
    assert pinned["pinned"] is True and pinned["expires_at"] is None
    time.sleep(3)  # past its 2 s keep-alive
    assert model(keyed, "tiny")["status"] == "loaded"
    unpinned = admin(keyed, "unpin", "tiny").json()
    assert unpinned["pinned"] is False and unpinned["expires_at"] > time.time()
    assert admin(keyed, "unload", "tiny").json()["status"] == "available"
    assert admin(keyed, "unload", "tiny").status_code == 200  # not loaded: nothing to do

    failed = admin(keyed, "load", "broken")
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "model_load_failed" and "'broken'" in failed.json()["error"]["message"]
    assert admin(keyed, "load", "nope").json()["error"]["code"] == "model_not_found"


def test_a_model_serving_a_stream_cannot_be_unloaded(keyed: ServerProcess) -> None:
    body = chat("tiny", max_tokens=200, stream=True, user="fault:slow")
    with httpx.stream("POST", f"{keyed.base_url}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=60) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator closes the response, and the request ends
        next(lines)
        busy = admin(keyed, "unload", "tiny")
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_busy"


def test_the_models_command_talks_to_the_server(keyed: ServerProcess) -> None:
    env = {**os.environ, "MLX_GATEWAY_URL": keyed.base_url, "MLX_GATEWAY_API_KEY": KEY}

    def cli(*args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "models", *args], capture_output=True,
                              text=True, env={**env, **overrides}, timeout=120, check=False)

    pinned = cli("pin", "org/keeper")
    assert pinned.returncode == 0 and "now loaded, pinned" in pinned.stdout
    listing = cli()
    assert listing.returncode == 0
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert set(rows) == {"tiny", "org/keeper", "broken", "hidden"}
    assert "loaded" in rows["org/keeper"] and "yes" in rows["org/keeper"] and "never" in rows["org/keeper"]
    assert cli("unpin", "org/keeper").returncode == 0
    refused = cli("load", "nope")
    assert refused.returncode == 1 and "404" in refused.stderr and "nope" in refused.stderr
    assert cli(MLX_GATEWAY_API_KEY="wrong").returncode == 1
    assert cli("load").returncode == 2  # usage: no model id
    assert cli(MLX_GATEWAY_URL="http://127.0.0.1:1").returncode == 3


def test_preloads_and_pins_load_in_the_background_and_the_allow_list_hides_the_rest(
    start_server: StartServer, residency_models: Path
) -> None:
    server = start_server("--models-dir", str(residency_models), "--test-faults", "--test-read-delay-s", "1.5",
                          "--allowed-model", "tiny", "--allowed-model", "org/*", "--allowed-model", "broken",
                          "--preload-model", "tiny", "--preload-model", "broken", "--preload-model", "nope",
                          "--preload-model", "hidden", "--pin-model", "org/keeper")
    health = server.wait_ready(timeout_s=30)
    assert health["ready"] is True and health["models_loaded"] == 0  # ready before the preloads (1.5 s each)

    def listing() -> dict[str, Any]:
        return {m["id"]: m for m in httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"]}

    assert set(listing()) == {"tiny", "org/keeper", "broken"}  # hidden is not allowed: not listed
    loading = until(lambda: [m for m in listing().values() if m["status"] == "loading"], 20, "a preload")
    assert loading[0]["progress"]["stage"] in ("queued", "reading")
    assert server.health().json()["ready"] is True
    first = until(lambda: next((m for m in httpx.get(server.base_url + "/health", timeout=10).json()["models"]
                                if m["progress"] and m["progress"]["stage"] == "reading"), None),
                  10, "a load in its reading stage")
    assert first["progress"]["bytes_total"] > 0 and first["progress"]["bytes_read"] < first["progress"]["bytes_total"]

    until(lambda: model(server, "org/keeper")["status"] == "loaded", 30, "the pinned model's load")
    until(lambda: model(server, "tiny")["status"] == "loaded", 30, "the preload of tiny")
    until(lambda: model(server, "broken")["status"] == "failed", 30, "the failed preload")
    assert model(server, "org/keeper")["pinned"] is True
    assert model(server, "broken")["error"]["code"] == "model_load_failed"
    for response in (httpx.get(server.base_url + "/v1/models/hidden", timeout=10),
                     httpx.post(server.base_url + "/v1/chat/completions", json=chat("hidden"), timeout=10),
                     admin(server, "load", "hidden")):
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "cannot preload model nope" in server.log() and "cannot preload model hidden" in server.log()
    assert server.health().json()["status"] == "degraded"  # a model failed; the others serve


def test_a_stream_keeps_going_while_another_model_loads(start_server: StartServer, residency_models: Path) -> None:
    server = start_server("--models-dir", str(residency_models), "--test-faults", "--test-read-delay-s", "3")
    server.wait_ready()
    arrivals: list[float] = []

    def read_stream() -> None:
        body = chat("tiny", max_tokens=120, stream=True, user="fault:slow")  # ~20 tokens/s for 6 s
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())

    threading.Thread(target=read_stream, daemon=True).start()
    until(lambda: len(arrivals) > 3, 30, "the stream's first tokens")
    started = time.monotonic()
    loaded = admin(server, "load", "org/keeper", headers={})  # reads for 3 s: the stream must not wait
    load_s = time.monotonic() - started
    assert loaded.status_code == 200 and load_s >= 3
    during = [b - a for a, b in itertools.pairwise(arrivals) if a >= started and b <= started + load_s]
    assert len(during) > 20  # ~20 chunks a second went on during the load
    assert max(during) < 1.0


def test_the_kv_cache_counts_in_the_memory_budget(start_server: StartServer, residency_models: Path) -> None:
    # The budget: tiny's weights (under twice its file size: float16 is held as float32 on the CPU) + one KV row
    # of 256 tokens (512 B per token, float32): a request of up to 256 tokens fits alone; two do not fit
    # together; one of 512 never fits.
    weights = 2 * (residency_models / "tiny" / "model.safetensors").stat().st_size
    budget_gb = (weights + 256 * 512 + 20_000) / 1024**3
    server = start_server("--models-dir", str(residency_models), "--test-faults", "--memory-budget-gb",
                          f"{budget_gb:.12f}", "--prompt-cache-gb", "0")
    server.wait_ready()
    url = f"{server.base_url}/v1/chat/completions"
    never = httpx.post(url, json=chat("tiny", max_tokens=400), timeout=60)
    assert never.status_code == 400
    assert never.json()["error"]["code"] == "memory_budget_exceeded"
    assert never.json()["error"]["param"] == "max_tokens"
    ends: dict[str, float] = {}

    def run(name: str) -> None:
        response = httpx.post(url, json=chat("tiny", max_tokens=40, user="fault:slow"), timeout=60)
        assert response.status_code == 200
        ends[name] = time.monotonic()

    first = threading.Thread(target=run, args=("first",))
    first.start()
    until(lambda: server.health().json()["requests_running"] == 1, 20, "the first request running")
    until(lambda: server.health().json()["memory"]["kv_cache_bytes"] == 256 * 512, 5, "its KV reservation")
    second = threading.Thread(target=run, args=("second",))
    second.start()
    until(lambda: server.health().json()["requests_waiting"] == 1, 20, "the second request waiting")
    first.join(60)
    second.join(60)
    assert ends["second"] - ends["first"] > 1.0  # it ran after the first (40 tokens at ~20 a second)
    until(lambda: server.health().json()["memory"]["kv_cache_bytes"] == 0, 5, "the reservations' release")
