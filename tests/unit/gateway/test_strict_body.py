"""Every POST body is decoded strictly, as OpenAI's and Anthropic's servers do: a value of the wrong JSON type
(a string for a boolean or a number, 0 for a boolean, a block without its `type`) is a 400 naming the field,
in the route's own error shape, never coerced."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

USER = [{"role": "user", "content": "hi"}]
ROUTES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "tiny", "messages": USER},
    "/v1/completions": {"model": "tiny", "prompt": "hi"},
    "/v1/responses": {"model": "tiny", "input": "hi"},
    "/v1/messages": {"model": "tiny", "max_tokens": 8, "messages": USER},
    "/v1/messages/count_tokens": {"model": "tiny", "messages": USER},
    "/admin/models/load": {"model": "tiny"},
}
ANTHROPIC = ("/v1/messages", "/v1/messages/count_tokens")

WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", {"stream": "true"}, "stream"),
    ("/v1/chat/completions", {"stream": 0}, "stream"),
    ("/v1/chat/completions", {"temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"n": "2"}, "n"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
     "messages[0].content[0]"),
    ("/v1/completions", {"stream": "true"}, "stream"),
    ("/v1/completions", {"max_tokens": "8"}, "max_tokens"),
    ("/v1/completions", {"echo": 1}, "echo"),
    ("/v1/responses", {"stream": "true"}, "stream"),
    ("/v1/responses", {"temperature": "0.5"}, "temperature"),
    ("/v1/responses", {"store": 0}, "store"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"text": "no type"}]}]}, "input[0].content[0]"),
    ("/v1/messages", {"stream": "true"}, "stream"),
    ("/v1/messages", {"max_tokens": "8"}, "max_tokens"),
    ("/v1/messages", {"temperature": "0.5"}, "temperature"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
     "messages[0].content[0]"),
    ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": 0}]}, "messages[0].content"),
    ("/admin/models/load", {"model": 1}, "model"),
]


def _error(response: Any, path: str) -> tuple[str, str | None]:
    """(message, param) from either API's error shape; Anthropic's has no param, so its message names it."""
    assert response.status_code == 400, response.text
    body = response.json()
    if path in ANTHROPIC:
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        return body["error"]["message"], None
    assert body["error"]["type"] == "invalid_request_error", body
    return body["error"]["message"], body["error"]["param"]


@pytest.mark.parametrize(("path", "override", "param"), WRONG_TYPES)
def test_a_wrong_json_type_is_a_400_naming_the_field(client: TestClient[Any], path: str,
                                                     override: dict[str, Any], param: str) -> None:
    message, named = _error(client.post(path, json={**ROUTES[path], **override}), path)
    assert param in message, message
    if path not in ANTHROPIC:
        assert named == param


@pytest.mark.parametrize("path", list(ROUTES))
def test_a_body_that_is_not_an_object_is_a_400(client: TestClient[Any], path: str) -> None:
    message, _ = _error(client.post(path, json=[ROUTES[path]]), path)
    assert "object" in message, message


@pytest.mark.parametrize("path", [p for p in ROUTES if not p.startswith("/admin")])
def test_right_types_still_pass(client: TestClient[Any], path: str) -> None:
    """Integers where numbers are asked for are numbers (JSON has one number type)."""
    number = {"/v1/messages/count_tokens": {}}.get(path, {"temperature": 1})
    response = client.post(path, json={**ROUTES[path], **number})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_an_integral_float_is_an_integer_as_json_schema_says(client: TestClient[Any], path: str) -> None:
    assert client.post(path, json={**ROUTES[path], "max_tokens": 8.0}).status_code == 200
    message, _ = _error(client.post(path, json={**ROUTES[path], "max_tokens": 8.5}), path)
    assert "max_tokens" in message
