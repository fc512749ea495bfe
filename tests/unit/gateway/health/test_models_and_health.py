"""GET /v1/models, /v1/models/{id}, /health, /health/live, /health/ready, /metrics."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

from mlx_backend.client.fake import FakeEngine
from mlx_backend.errors import EngineError, EngineErrorCode
from tests.unit.gateway.conftest import ClientFactory, chat_body


def test_models_are_listed_with_openai_fields_and_local_extras(client: TestClient[Any]) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {"tiny", "org/nested"}
    tiny = by_id["tiny"]
    assert tiny["object"] == "model" and isinstance(tiny["created"], int) and tiny["owned_by"] == "local"
    assert tiny["context_length"] == 512 and tiny["loaded"] is False and tiny["status"] == "available"
    assert by_id["org/nested"]["owned_by"] == "org"


def test_a_model_shows_loaded_after_use(client: TestClient[Any]) -> None:
    client.post("/v1/chat/completions", json=chat_body())
    model = client.get("/v1/models/tiny").json()
    assert model["loaded"] is True and model["status"] == "loaded"


def test_retrieve_accepts_org_slash_name_ids(client: TestClient[Any]) -> None:
    assert client.get("/v1/models/org/nested").json()["id"] == "org/nested"


def test_retrieve_unknown_or_escaping_ids_is_404(client: TestClient[Any]) -> None:
    # Percent-encoded so the HTTP client cannot normalise the dots away before the server sees them.
    for model_id in ("nope", "..%2Fmodels%2Ftiny", "org%2F..%2F..%2Ftiny", "%2Fetc%2Fpasswd", "tiny%00"):
        response = client.get(f"/v1/models/{model_id}")
        assert response.status_code == 404, model_id
        assert response.json()["error"]["code"] in ("model_not_found", "not_found")


def test_failed_model_is_reported_with_its_cause(make_client: ClientFactory) -> None:
    failure = EngineError(EngineErrorCode.MODEL_LOAD_FAILED, "model 'tiny': truncated weights")
    client = make_client(FakeEngine(failures={"tiny": failure}))
    model = client.get("/v1/models/tiny").json()
    assert model["status"] == "failed"
    assert model["error"]["code"] == "model_load_failed" and "truncated" in model["error"]["message"]
    health = client.get("/health").json()
    assert health["status"] == "degraded" and health["ready"] is True  # org/nested still loadable


def test_health_reports_what_the_watchdog_reads(client: TestClient[Any]) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok" and health["ready"] is True
    assert health["models_loaded"] == 0 and health["models_available"] == 2
    assert health["engine"]["state"] == "up"
    assert health["version"] and health["uptime_s"] >= 0
    assert client.get("/health/live").json() == {"status": "alive"}
    assert client.get("/health/ready").status_code == 200


def test_no_models_means_live_but_not_ready_with_a_reason(make_client: ClientFactory, models_dir: Any) -> None:
    import shutil

    shutil.rmtree(models_dir)
    client = make_client()
    response = client.get("/health")
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["ready"] is False and "no loadable model" in response.json()["reason"]
    assert client.get("/health/live").status_code == 200


def test_metrics_expose_prometheus_text_with_our_names(client: TestClient[Any]) -> None:
    client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("mlx_gateway_http_requests_total", "mlx_gateway_generation_tokens_total",
                 "mlx_gateway_time_to_first_token_seconds_bucket", "mlx_gateway_e2e_request_latency_seconds",
                 "mlx_gateway_num_requests_running", "mlx_gateway_models_available", "process_cpu_seconds_total"):
        assert name in text
    assert 'route="/v1/chat/completions"' in text


@pytest.mark.parametrize("path", [
    "/v1/models", "/v1/models/tiny", "/v1/models/nope", "/v1/responses/resp_nope", "/health", "/health/live",
    "/health/ready", "/metrics", "/", "/openapi.json",
])
def test_head_answers_every_get_route_with_the_gets_status_and_headers_and_no_body(client: TestClient[Any],
                                                                                   path: str) -> None:
    got, head = client.get(path), client.head(path)
    assert head.status_code == got.status_code and head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


def test_head_on_a_path_without_get_is_405(client: TestClient[Any]) -> None:
    assert client.head("/v1/chat/completions").status_code == 405
