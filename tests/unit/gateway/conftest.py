"""HTTP-layer tests run the real app in-process against the scripted engine (mlx_backend.client.fake)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_asgi_app
from gateway.runtime import GatewayRuntime
from gateway.settings import Settings
from mlx_backend.client.fake import FakeEngine
from mlx_backend.registry import ModelRegistry

ClientFactory = Callable[..., TestClient[Any]]


def write_model_folder(root: Path, model_id: str, context_length: int = 512) -> Path:
    """Enough of a model folder for the registry (the fake engine never reads weights)."""
    folder = root / model_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": context_length}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_model_folder(root, "tiny")
    write_model_folder(root, "org/nested")
    return root


@pytest.fixture
def make_client(models_dir: Path) -> Iterator[ClientFactory]:
    clients: list[TestClient[Any]] = []

    def factory(engine: FakeEngine | None = None, **settings: Any) -> TestClient[Any]:
        config = Settings(models_dirs=(models_dir,), hf_cache=False, demo_model=False, **settings)
        registry = ModelRegistry(config.models_dirs, None, False, allowed=config.allowed_models)
        runtime = GatewayRuntime(config, engine or FakeEngine(), registry)
        # A loopback Host: the default allow-list refuses TestClient's own 'testserver.local'.
        app = create_asgi_app(runtime)
        client: TestClient[Any] = TestClient(app, base_url="http://127.0.0.1")  # type: ignore[arg-type]
        client.__enter__()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient[Any]:
    return make_client()


def chat_body(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **overrides}


def sse_payloads(text: str) -> list[Any]:
    """The JSON payloads of an SSE body, with '[DONE]' kept as a string."""
    payloads: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads
