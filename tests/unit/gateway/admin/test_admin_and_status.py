"""The admin API, the allow-list and the status page at the HTTP layer, against the scripted engine (the real
engine's side is tests/unit/mlx_backend/engine/test_batcher_residency.py and tests/integration/test_residency.py)."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest

from gateway.admin.wire import Model
from gateway.health import status_page
from gateway.health.wire import Health
from gateway.runtime import GatewayRuntime
from gateway.settings import Settings
from mlx_backend.client.fake import FakeEngine
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelRegistry
from tests.unit.gateway.conftest import ClientFactory, chat_body

KEY = {"Authorization": "Bearer s3cret"}


def test_load_pin_unpin_unload_answer_with_the_model(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine, api_key="s3cret")
    loaded = client.post("/admin/models/load", json={"model": "org/nested"}, headers=KEY)
    assert loaded.status_code == 200
    assert loaded.json()["id"] == "org/nested" and loaded.json()["status"] == "loaded"
    pinned = client.post("/admin/models/pin", json={"model": "org/nested"}, headers=KEY).json()
    assert pinned["pinned"] is True
    assert client.post("/admin/models/unpin", json={"model": "org/nested"}, headers=KEY).json()["pinned"] is False
    gone = client.post("/admin/models/unload", json={"model": "org/nested"}, headers=KEY).json()
    assert gone["status"] == "available" and gone["loaded"] is False
    assert engine.controls == [("load", "org/nested"), ("pin", "org/nested"), ("unpin", "org/nested"),
                               ("unload", "org/nested")]


def test_the_admin_api_needs_the_key_and_json(make_client: ClientFactory) -> None:
    client = make_client(api_key="s3cret")
    for action in ("load", "unload", "pin", "unpin"):
        response = client.post(f"/admin/models/{action}", json={"model": "tiny"})
        assert response.status_code == 401, action
    assert client.post("/admin/models/load", content=b"model=tiny", headers=KEY).status_code == 415
    bad = client.post("/admin/models/load", json={"model": "tiny", "pin": True}, headers=KEY)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "pin"


def test_admin_errors_are_the_engines_own(make_client: ClientFactory) -> None:
    broken = EngineError(EngineErrorCode.MODEL_LOAD_FAILED, "The model 'tiny' cannot be loaded: bad weights.")
    client = make_client(FakeEngine(failures={"tiny": broken}))
    failed = client.post("/admin/models/load", json={"model": "tiny"})
    assert failed.status_code == 500
    assert failed.json()["error"] == {"message": broken.message, "type": "server_error", "param": None,
                                      "code": "model_load_failed"}
    missing = client.post("/admin/models/pin", json={"model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_unload_of_a_busy_model_is_409(make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine()

    async def busy(action: str, model: str) -> None:
        raise EngineError(EngineErrorCode.MODEL_BUSY, f"The model '{model}' is serving requests.", "model")

    monkeypatch.setattr(engine, "control", busy)
    response = make_client(engine).post("/admin/models/unload", json={"model": "tiny"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "model_busy" and response.json()["error"]["param"] == "model"


def test_the_allow_list_hides_other_models_everywhere(make_client: ClientFactory) -> None:
    client = make_client(allowed_models=("org/*",))
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["org/nested"]
    for response in (client.get("/v1/models/tiny"), client.post("/v1/chat/completions", json=chat_body()),
                     client.post("/admin/models/load", json={"model": "tiny"})):
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert client.post("/v1/chat/completions", json=chat_body(model="org/nested")).status_code == 200


def test_models_carry_their_residency(make_client: ClientFactory) -> None:
    client = make_client(keep_alive_s=600, model_keep_alive=("org/*=-1",))
    client.post("/v1/chat/completions", json=chat_body())
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["tiny"]["keep_alive_s"] == 600 and models["org/nested"]["keep_alive_s"] == -1
    assert models["tiny"]["loaded_at"] == pytest.approx(time.time(), abs=60)
    health = client.get("/health").json()
    assert [m["id"] for m in health["models"]] == ["tiny"]
    assert health["memory"]["budget_bytes"] == 1 << 30


def test_the_status_page_shows_the_models_and_asks_a_browser_for_the_key(make_client: ClientFactory) -> None:
    client = make_client(api_key="s3cret")
    client.post("/admin/models/pin", json={"model": "org/nested"}, headers=KEY)
    refused = client.get("/")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Basic ")
    basic = {"Authorization": "Basic " + base64.b64encode(b"anyone:s3cret").decode()}
    page = client.get("/", headers=basic)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "org/nested" in page.text and "tiny" in page.text and "never (pinned)" in page.text
    assert 'http-equiv="refresh"' in page.text
    assert "<script" not in page.text and "http://" not in page.text.split("<footer>")[0]  # nothing fetched
    assert client.get("/", headers=KEY).status_code == 200
    wrong = {"Authorization": "Basic " + base64.b64encode(b"anyone:nope").decode()}
    assert client.get("/", headers=wrong).status_code == 401
    assert client.get("/v1/models", headers=basic).status_code == 401  # Basic is for the page only


def test_the_status_page_escapes_what_it_shows() -> None:
    health = Health(status="degraded", ready=True, reason="<b>bad</b>", models_loaded=0, models_available=1,
                    requests_running=0, requests_waiting=0,
                    engine=_engine(), uptime_s=5.0, version="0")
    model = Model(id="<script>alert(1)</script>", created=0, owned_by="x")
    html = status_page.render(status_page.PageData(health, [model], None, None, False, time.time()))
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;bad" in html


def _engine() -> Any:
    from gateway.health.wire import EngineHealth

    return EngineHealth(state="up", pid=1, restarts=0, device="cpu", last_exit=None, seconds_since_progress=None)


def test_tokens_per_second_is_the_token_counter_s_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import metrics
    from gateway.health import report

    clock = [1000.0]
    monkeypatch.setattr(report.time, "monotonic", lambda: clock[0])
    runtime = GatewayRuntime(Settings(), FakeEngine(), ModelRegistry((), None, False))
    assert runtime.health.tokens_per_second() is None  # one sample: no rate yet
    metrics.GENERATION_TOKENS.labels("rate-test").inc(50)
    clock[0] += 2.0
    assert runtime.health.tokens_per_second() == pytest.approx(25.0)
    clock[0] += 20.0  # quiet since: the burst is out of the window
    assert runtime.health.tokens_per_second() == 0.0
    metrics.GENERATION_TOKENS.labels("rate-test").inc(30)
    clock[0] += 3.0
    assert runtime.health.tokens_per_second() == pytest.approx(30 / 23)  # since the last sample before the window
