"""Broken model folders, made for real: each is a clear error naming the model and the cause within 5 s,
the server stays up, the models already loaded stay loaded, and the next valid request works."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import tiny_models
from tests.support.server import ServerProcess

Breaker = Callable[[Path], Path]
FAULTS: dict[str, tuple[Breaker, str]] = {
    # name: (how the folder is broken, a word the error message must contain)
    "no-config": (tiny_models.remove_config, "config.json"),
    "bad-config": (tiny_models.write_invalid_config_json, "config.json"),
    "no-weights": (tiny_models.remove_weights, "safetensors"),
    "truncated": (tiny_models.truncate_weights, "truncated"),
    "bad-header": (tiny_models.corrupt_safetensors_header, "header"),
    "huge-header": (lambda p: tiny_models.corrupt_safetensors_header(p, "huge_length"), "header"),
    "wrong-shapes": (tiny_models.mismatch_shapes, "shape"),
    "unknown-arch": (tiny_models.set_model_type, "no_such_arch"),
    "no-tokenizer": (tiny_models.remove_tokenizer, "tokenizer"),
    "bad-tokenizer": (tiny_models.break_tokenizer, "tokenizer"),
    "weights-dir": (tiny_models.replace_weights_with_directory, "safetensors"),
    "dangling-link": (tiny_models.replace_weights_with_dangling_symlink, "safetensors"),
}
EXPECTED_CODES = {"model_load_failed", "model_unsupported"}


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("broken")
    good = tiny_models.make_tiny_model(root / "good")
    for name, (breaker, _) in FAULTS.items():
        breaker(tiny_models.copy_model(good, root / name))
    return root


@pytest.fixture(scope="module")
def server(broken_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    server = ServerProcess(["--models-dir", str(broken_models)], log).start()
    server.wait_ready()
    yield server
    server.stop()


def chat(server: ServerProcess, model: str) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_broken_folder_is_a_clear_error_and_costs_nothing_else(server: ServerProcess, fault: str) -> None:
    assert chat(server, "good").status_code == 200
    loaded_before = server.health().json()["models_loaded"]
    started = time.monotonic()
    response = chat(server, fault)
    assert time.monotonic() - started < 5
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] in EXPECTED_CODES
    assert fault in error["message"] and FAULTS[fault][1].lower() in error["message"].lower(), error["message"]
    health = server.health().json()
    assert health["models_loaded"] == loaded_before and health["engine"]["restarts"] == 0
    model = httpx.get(f"{server.base_url}/v1/models/{fault}", timeout=5).json()
    assert model["status"] == "failed" and model["error"]["code"] == error["code"]
    assert chat(server, "good").status_code == 200


def test_a_failed_model_is_not_retried_on_every_request(server: ServerProcess) -> None:
    assert chat(server, "truncated").status_code == 500
    first = httpx.get(f"{server.base_url}/v1/models/truncated", timeout=5).json()["error"]["retry_after_s"]
    time.sleep(1.5)
    for _ in range(5):
        assert chat(server, "truncated").status_code == 500
    time.sleep(0.5)  # let a heartbeat carry the engine's view
    later = httpx.get(f"{server.base_url}/v1/models/truncated", timeout=5).json()["error"]["retry_after_s"]
    assert later <= first - 1.5  # the backoff kept running: no new attempt reset it


def test_a_failed_model_is_retried_once_its_files_are_fixed(server: ServerProcess, broken_models: Path) -> None:
    assert chat(server, "no-tokenizer").status_code == 500
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(broken_models / "good" / name, broken_models / "no-tokenizer" / name)
    assert chat(server, "no-tokenizer").status_code == 200


def test_a_model_too_large_for_the_budget_is_refused_before_loading(
    broken_models: Path, tmp_path: Path
) -> None:
    server = ServerProcess(["--models-dir", str(broken_models), "--memory-budget-gb", "0.00001"],
                           tmp_path / "server.log").start()
    try:
        server.wait_ready()
        response = chat(server, "good")
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "model_too_large" and "good" in error["message"]
        assert server.health().json()["models_loaded"] == 0
    finally:
        server.stop()


def test_a_loaded_model_whose_folder_is_deleted_fails_cleanly(server: ServerProcess, broken_models: Path) -> None:
    doomed = tiny_models.copy_model(broken_models / "good", broken_models / "doomed")
    assert chat(server, "doomed").status_code == 200
    shutil.rmtree(doomed)
    response = chat(server, "doomed")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert chat(server, "good").status_code == 200


def test_boot_with_no_loadable_model_is_live_but_not_ready(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = ServerProcess(["--models-dir", str(empty)], tmp_path / "server.log").start()
    try:
        server.wait_ready(path="/health/live")
        time.sleep(1)
        response = server.health()
        assert response.status_code == 503 and "no loadable model" in response.json()["reason"]
        assert server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()
