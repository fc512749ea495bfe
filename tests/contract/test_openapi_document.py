"""openapi/openapi.json is what the app serves; regenerate with `mlx-gateway export-openapi`."""

from __future__ import annotations

import json
import re

from gateway.cli import OPENAPI_PATH, openapi_document


def test_published_openapi_matches_the_app() -> None:
    assert OPENAPI_PATH.read_bytes() == openapi_document(), "run: mlx-gateway export-openapi"


def test_every_route_has_an_operation_id_and_documents_errors() -> None:
    document = json.loads(openapi_document())
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert all(op.get("operationId") for op in operations)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id}", "/health",
            "/metrics", "/v1/embeddings"} <= set(document["paths"])


def test_every_referenced_schema_is_in_the_document() -> None:
    text = openapi_document().decode()
    document = json.loads(text)
    referenced = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
    assert referenced and referenced <= set(document["components"]["schemas"])


def test_the_api_key_is_declared_and_only_public_routes_waive_it() -> None:
    document = json.loads(openapi_document())
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerKey"] == {**schemes["bearerKey"], "type": "http", "scheme": "bearer"}
    assert schemes["anthropicKey"]["in"] == "header" and schemes["anthropicKey"]["name"] == "x-api-key"
    assert document["security"] == [{"bearerKey": []}, {"anthropicKey": []}]
    waived = {path for path, ops in document["paths"].items() for op in ops.values() if op.get("security") == []}
    assert waived == {"/health", "/health/live", "/health/ready", "/metrics"}


def test_streamed_answers_are_event_streams_of_their_event_types() -> None:
    document = json.loads(openapi_document())
    expected = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "Completion",
                "/v1/responses": "OutputTextDeltaEvent", "/v1/messages": "ContentBlockDeltaEvent"}
    for path, event in expected.items():
        stream = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        data = stream["properties"]["data"]
        payload = data if "contentSchema" in data else data["anyOf"][1]  # else: `[DONE]` or an event
        assert payload["contentMediaType"] == "application/json", path
        assert {"$ref": f"#/components/schemas/{event}"} in payload["contentSchema"]["oneOf"], path
        assert stream["description"]


def test_what_the_schemas_accept_but_the_server_refuses_is_said() -> None:
    document = json.loads(openapi_document())
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
        assert "Refused by design" in document["paths"][path]["post"]["requestBody"]["description"]


def test_every_get_route_answers_head_too() -> None:
    document = json.loads(openapi_document())
    for path, operations in document["paths"].items():
        if "get" in operations:
            head = operations["head"]
            assert set(head["responses"]) == set(operations["get"]["responses"]), path
            assert not any("content" in answer for answer in head["responses"].values()), path
            assert head.get("security") == operations["get"].get("security"), path
