"""Every failure is OpenAI's error shape with the right status, and names the parameter at fault."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway import metrics
from mlx_backend.client.fake import FakeEngine
from mlx_backend.errors import EngineError, EngineErrorCode
from tests.unit.gateway.conftest import ClientFactory, chat_body


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error  # type: ignore[no-any-return]


def post_raw(client: TestClient[Any], body: bytes | str, path: str = "/v1/chat/completions") -> Any:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def test_unknown_model_is_404_model_not_found(client: TestClient[Any]) -> None:
    error = error_of(client.post("/v1/chat/completions", json=chat_body(model="nope")), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "nope" in error["message"]


@pytest.mark.parametrize(("overrides", "param"), [
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"store": True}, "store"),
])
def test_unsupported_parameters_are_400_naming_them(client: TestClient[Any], overrides: dict[str, Any],
                                                    param: str) -> None:
    error = error_of(client.post("/v1/chat/completions", json=chat_body(**overrides)), 400)
    assert error["param"] == param and error["code"] == "unsupported_parameter"


def test_neutral_values_of_unsupported_parameters_are_accepted(client: TestClient[Any]) -> None:
    body = chat_body(n=1, logprobs=False, tools=[], response_format={"type": "text"}, tool_choice="none")
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_unknown_field_is_400_naming_it(client: TestClient[Any]) -> None:
    error = error_of(client.post("/v1/chat/completions", json=chat_body(frobnicate=1)), 400)
    assert error["param"] == "frobnicate"


@pytest.mark.parametrize(("overrides", "param"), [
    ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 9}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": 2**70}, "seed"),
    ({"model": 3}, "model"),
])
def test_wrong_types_and_absurd_numbers_are_400_naming_the_field(
    client: TestClient[Any], overrides: dict[str, Any], param: str
) -> None:
    error = error_of(client.post("/v1/chat/completions", json=chat_body(**overrides)), 400)
    assert error["param"] == param, error


def test_missing_required_field_is_400(client: TestClient[Any]) -> None:
    error = error_of(client.post("/v1/chat/completions", json={"model": "tiny"}), 400)
    assert "messages" in error["message"]


@pytest.mark.parametrize("body", [b"{bad", b"", b"[1, 2", b"\xff\xfe{}", b"null"])
def test_malformed_or_truncated_json_is_400(client: TestClient[Any], body: bytes) -> None:
    error_of(post_raw(client, body), 400)


def test_empty_stop_string_is_400(client: TestClient[Any]) -> None:
    assert error_of(client.post("/v1/chat/completions", json=chat_body(stop="")), 400)["param"] == "stop"


def test_oversized_body_is_413(make_client: ClientFactory) -> None:
    client = make_client(max_body_bytes=1024)
    error = error_of(post_raw(client, b'{"model": "' + b"x" * 4096 + b'"}'), 413)
    assert error["code"] == "request_too_large"


def test_unknown_route_and_wrong_method_have_the_error_shape(client: TestClient[Any]) -> None:
    assert error_of(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(client.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


def test_context_length_exceeded_is_400_before_any_generation(make_client: ClientFactory) -> None:
    client = make_client(FakeEngine(context_length=5))
    long_prompt = " ".join(["word"] * 10)
    error = error_of(client.post("/v1/chat/completions", json=chat_body(
        messages=[{"role": "user", "content": long_prompt}])), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"


@pytest.mark.parametrize(("code", "status"), [
    (EngineErrorCode.MODEL_LOAD_FAILED, 500), (EngineErrorCode.MODEL_UNSUPPORTED, 500),
    (EngineErrorCode.MODEL_TOO_LARGE, 500), (EngineErrorCode.ENGINE_UNAVAILABLE, 503),
])
def test_model_failures_are_clear_errors_naming_the_model(make_client: ClientFactory, code: EngineErrorCode,
                                                          status: int) -> None:
    failure = EngineError(code, "model 'tiny' failed: corrupt safetensors header in model.safetensors")
    client = make_client(FakeEngine(failures={"tiny": failure}))
    error = error_of(client.post("/v1/chat/completions", json=chat_body()), status)
    assert error["code"] == code.value and "tiny" in error["message"]
    assert client.get("/health/live").status_code == 200


def test_internal_error_is_500_carrying_the_request_id(make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    def explode(*_: Any) -> Any:  # a bug in the gateway itself
        raise RuntimeError("boom")

    monkeypatch.setattr("gateway.chat.render.chat_completion", explode)
    client = make_client()
    response = client.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": "req-abc"})
    error = error_of(response, 500)
    assert response.headers["x-request-id"] == "req-abc"
    assert "req-abc" in error["message"] and "boom" not in error["message"]
    assert any(getattr(r, "request_id", None) == "req-abc" and r.exc_info for r in caplog.records)


@pytest.mark.parametrize("stream", [True, False])
def test_an_internal_error_is_recorded_as_an_error_not_a_cancellation(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    def explode(*_: Any) -> Any:  # a bug in the gateway while the engine still generates
        raise RuntimeError("boom")

    monkeypatch.setattr("gateway.chat.render.chat_delta_chunk" if stream else "gateway.chat.render.Folder.add", explode)
    cancelled = metrics.REQUESTS_CANCELLED._value.get()
    failed = metrics.REQUESTS_FINISHED.labels("tiny", "error")._value.get()
    response = make_client().post("/v1/chat/completions", json=chat_body(stream=stream, max_tokens=50))
    if stream:
        assert response.status_code == 200 and '"type":"server_error"' in response.text.replace(" ", "")
    else:
        error_of(response, 500)
    ends = [r for r in caplog.records if r.name == "mlx_gateway.requests"]
    assert len(ends) == 1 and "error (failed)" in ends[0].getMessage() and ends[0].levelno == logging.WARNING
    assert metrics.REQUESTS_CANCELLED._value.get() == cancelled
    assert metrics.REQUESTS_FINISHED.labels("tiny", "error")._value.get() == failed + 1


def test_api_key_guards_v1_routes_but_not_health(make_client: ClientFactory) -> None:
    client = make_client(api_key="s3cret")
    assert error_of(client.get("/v1/models"), 401)["type"] == "authentication_error"
    assert error_of(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health/live").status_code == 200


def test_the_error_table_in_the_docs_matches_the_code() -> None:
    from pathlib import Path

    from gateway.errors import ErrorKind

    doc = (Path(__file__).resolve().parents[3] / "docs" / "api.md").read_text()
    for kind in ErrorKind:
        spec = kind.value
        assert f"| {spec.status} | `{spec.type}` | `{spec.code}` |" in doc, kind


@pytest.mark.parametrize("bias", [{"x": 5}, {"-1": 5}, {"01": 5}, {"1.5": 5}, {"1": 101}, {"1": -100.5},
                                  {"100000000000000000000": 1}, {"2147483648": 1}])
def test_a_logit_bias_that_is_not_token_ids_to_amounts_within_100_is_a_400(client: TestClient[Any],
                                                                          bias: dict[str, float]) -> None:
    error = error_of(client.post("/v1/chat/completions", json=chat_body(logit_bias=bias)), 400)
    assert error["param"] == "logit_bias" and error["code"] == "invalid_request"


def test_a_refused_request_is_logged_with_its_route_status_and_message(client: TestClient[Any],
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mlx_gateway"):
        client.post("/v1/chat/completions", json={**chat_body(), "frobnicate": 1})
    assert "POST /v1/chat/completions -> 400 Unrecognized request argument supplied: frobnicate" in caplog.text
