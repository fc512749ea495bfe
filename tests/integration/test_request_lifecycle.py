"""A request's life against a real server, as odd but ordinary clients live it (issue 15): quiet spells
longer than every timeout, timeouts that must stop the engine's work too, ids that clients reuse, values
at the edges of what the API allows, clients that leave while queued, and a SIGTERM with work queued.

Each test checks the engine's own counts (from its heartbeats, in /health's `engine` section) as well as
the gateway's: a request the gateway has let go of must not still be running in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import StartServer
from tests.support.server import ServerProcess
from tests.support.tiny_models import NEVER_STOP

pytestmark = pytest.mark.slow

SLOW = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 60, "user": "fault:slow",
        "logit_bias": NEVER_STOP}


def counts(server: ServerProcess) -> dict[str, int]:
    health = server.health().json()
    return {"gateway_running": health["requests_running"], "gateway_waiting": health["requests_waiting"],
            "engine_running": health["engine"]["requests_running"],
            "engine_waiting": health["engine"]["requests_waiting"]}


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        time.sleep(0.05)


def quiet(server: ServerProcess) -> bool:
    return not any(counts(server).values())


def warm(server: ServerProcess) -> None:
    """The first request pays for the engine's imports and the model's load: keep that out of short timeouts."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    deadline = time.monotonic() + 60
    while httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).status_code != 200:
        assert time.monotonic() < deadline, "the model never loaded"  # each try may time out while it loads


def sdk(server: ServerProcess, **options: Any) -> openai.OpenAI:
    # No retries: a reset connection or a 5xx must show, not be papered over.
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, **options)


def test_the_first_request_after_a_quiet_spell_longer_than_every_timeout_is_served(
    start_server: StartServer, models_dir: Path
) -> None:
    server = start_server("--models-dir", str(models_dir), "--test-faults", "--stall-timeout-s", "1",
                          "--header-timeout-s", "1", "--request-timeout-s", "3")
    server.wait_ready()
    client = sdk(server)
    warm(server)  # the model's load on a busy machine may take longer than the 3 s request timeout
    time.sleep(4)  # past the stall kill point (1.5 s), the header timeout, the request timeout
    # One second of decoding (the "slow" fault paces the steps), so the supervisor judges it while it runs.
    stream = client.chat.completions.create(stream=True, **SLOW | {"max_tokens": 20})  # type: ignore[call-overload]
    finishes = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    wait_until(lambda: quiet(server), 1.0, "the engine is idle again")
    health = server.health().json()
    assert health["engine"]["restarts"] == 0 and health["status"] == "ok"
    assert health["engine"]["seconds_since_progress"] is None  # idle: nothing is judged


def test_a_request_past_its_timeout_is_stopped_in_the_engine_too(start_server: StartServer,
                                                                  models_dir: Path) -> None:
    server = start_server("--models-dir", str(models_dir), "--test-faults", "--request-timeout-s", "1")
    server.wait_ready()
    warm(server)
    client = sdk(server)
    with pytest.raises(openai.InternalServerError) as timed_out:
        client.chat.completions.create(**SLOW | {"max_tokens": 200})  # type: ignore[call-overload]
    assert timed_out.value.status_code == 504
    wait_until(lambda: quiet(server), 1.0, "the engine stops the timed-out request")
    with pytest.raises(openai.APIError, match="request timeout"):  # the stream's error event, raised by the SDK
        list(client.chat.completions.create(stream=True, **SLOW | {"max_tokens": 200}))  # type: ignore[call-overload]
    wait_until(lambda: quiet(server), 1.0, "the engine stops the timed-out stream")


def test_a_timed_out_stream_ends_with_an_error_event_then_done(start_server: StartServer, models_dir: Path) -> None:
    server = start_server("--models-dir", str(models_dir), "--test-faults", "--request-timeout-s", "1")
    server.wait_ready()
    warm(server)
    body = {**SLOW, "max_tokens": 200, "stream": True}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
    events = [block[6:] for block in response.text.split("\n\n") if block.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
    wait_until(lambda: quiet(server), 1.0, "the engine stops the timed-out stream")


def test_concurrent_requests_reusing_one_request_id_each_get_their_own_answer(shared_server: ServerProcess) -> None:
    prompts = ["the first question", "another question entirely", "a third", "and the fourth one"]

    def ask(prompt: str, headers: dict[str, str]) -> httpx.Response:
        body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
                "temperature": 0}
        return httpx.post(shared_server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)

    alone = {p: ask(p, {}).json()["choices"][0]["message"]["content"] for p in prompts}

    async def together() -> list[httpx.Response]:
        return await asyncio.gather(*[asyncio.to_thread(ask, p, {"x-request-id": "same-id"}) for p in prompts])

    responses = asyncio.run(together())
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == [alone[p] for p in prompts]
    assert {r.headers["x-request-id"] for r in responses} == {"same-id"}  # echoed for the client's logs
    assert len({r.json()["id"] for r in responses}) == 4  # but never used as the key inside


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 0])
def test_seeds_across_the_whole_int64_range_are_served_and_reproducible(shared_server: ServerProcess,
                                                                        seed: int) -> None:
    client = sdk(shared_server)

    def draw() -> str | None:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "pick"}],
                                               max_tokens=12, temperature=1.0, seed=seed)
        return reply.choices[0].message.content

    assert draw() == draw()


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_a_vanishing_temperature_is_greedy_decoding(shared_server: ServerProcess, temperature: float) -> None:
    client = sdk(shared_server)

    def reply(t: float) -> str | None:
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "say"}],
                                                max_tokens=12, temperature=t)
        return answer.choices[0].message.content

    assert reply(temperature) == reply(0.0)


def test_a_client_that_leaves_while_queued_is_dropped_before_its_prefill(start_server: StartServer,
                                                                         models_dir: Path) -> None:
    server = start_server("--models-dir", str(models_dir), "--test-faults", "--max-running", "1")
    server.wait_ready()
    running = threading.Thread(target=lambda: httpx.post(server.base_url + "/v1/chat/completions",
                                                         json={**SLOW, "max_tokens": 80}, timeout=60))
    running.start()  # four seconds of decoding at the "slow" pace, holding the one batch slot
    wait_until(lambda: counts(server)["engine_running"] == 1, 10, "the first request runs")
    with contextlib.suppress(httpx.ReadTimeout):  # queued behind it, this client gives up and hangs up
        httpx.post(server.base_url + "/v1/chat/completions", json={**SLOW, "max_tokens": 5}, timeout=0.5)
    wait_until(lambda: counts(server)["gateway_waiting"] == 0 and counts(server)["engine_waiting"] == 0, 1.0,
               "the queued request is dropped while the first still runs")
    assert counts(server)["engine_running"] == 1  # the first one is untouched
    running.join()


def test_sigterm_with_requests_queued_answers_each_in_a_documented_way(start_server: StartServer,
                                                                       models_dir: Path) -> None:
    server = start_server("--models-dir", str(models_dir), "--test-faults", "--max-running", "1",
                          "--drain-timeout-s", "1")
    server.wait_ready()
    url = server.base_url + "/v1/chat/completions"
    results: dict[str, Any] = {}

    def stream(name: str) -> None:
        with httpx.stream("POST", url, json={**SLOW, "max_tokens": 200, "stream": True}, timeout=30) as response:
            results[name] = (response.status_code, [line for line in response.iter_lines() if line])

    def whole(name: str) -> None:
        response = httpx.post(url, json={**SLOW, "max_tokens": 200}, timeout=30)
        results[name] = (response.status_code, response.json())

    first = threading.Thread(target=stream, args=("running",))
    first.start()
    wait_until(lambda: counts(server)["engine_running"] == 1, 10, "the first request runs")
    queued = [threading.Thread(target=whole, args=("queued-1",)), threading.Thread(target=whole, args=("queued-2",)),
              threading.Thread(target=stream, args=("queued-stream",))]
    for thread in queued:
        thread.start()
    wait_until(lambda: counts(server)["gateway_waiting"] == 3, 5, "three requests wait")
    server.signal(signal.SIGTERM)
    for thread in [first, *queued]:
        thread.join(20)
    assert server.wait_exit(20) == 0
    status, lines = results["running"]
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"  # cut by the deadline, cleanly
    for name in ("queued-1", "queued-2"):
        status, body = results[name]
        assert status == 503 and body["error"]["code"] == "server_shutting_down", results[name]
    status, lines = results["queued-stream"]
    assert status == 503 and "server_shutting_down" in lines[0]  # never started: a real HTTP error


def test_an_engine_past_its_restart_budget_makes_the_server_exit_for_its_service_manager(
    start_server: StartServer, models_dir: Path
) -> None:
    server = start_server("--models-dir", str(models_dir), "--test-faults", "--engine-restart-budget", "1")
    server.wait_ready()
    crash = {**SLOW, "user": "fault:abort"}
    httpx.post(server.base_url + "/v1/chat/completions", json=crash, timeout=30)  # crash one: restarted
    server.wait_ready()
    httpx.post(server.base_url + "/v1/chat/completions", json=crash, timeout=30)  # crash two: budget spent
    assert server.wait_exit(30) == 3
    assert "exiting with code 3" in server.log()
