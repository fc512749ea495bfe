"""openapi/openapi.json is what the app serves; regenerate with `mlx-gateway export-openapi`."""

from __future__ import annotations

import json

from gateway.cli import OPENAPI_PATH, openapi_document


def test_published_openapi_matches_the_app() -> None:
    assert OPENAPI_PATH.read_bytes() == openapi_document(), "run: mlx-gateway export-openapi"


def test_every_route_has_an_operation_id_and_documents_errors() -> None:
    document = json.loads(openapi_document())
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert all(op.get("operationId") for op in operations)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id}", "/health",
            "/metrics"} <= set(document["paths"])
