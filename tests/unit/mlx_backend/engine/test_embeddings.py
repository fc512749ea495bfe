"""Embeddings on the engine side: the BERT encoder against an independent numpy forward pass, pooling,
Matryoshka truncation, batching, what sentence-transformers' files say, Qwen3-Embedding through mlx-lm, and
the Embed commands waiting for their model in the model cache."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3

from mlx_backend.contract import Embed, Embedded, Event, Failed, Loading, Started
from mlx_backend.embedding_spec import EmbeddingSpec, read_spec
from mlx_backend.engine import embeddings, model_check, model_load
from mlx_backend.engine.pacing import PrefillPacer
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelRegistry
from tests.support.tiny_embedding_models import make_tiny_bert, make_tiny_qwen3_embedding
from tests.support.tiny_models import make_tiny_model
from tests.unit.mlx_backend.engine.residency.test_models import Recorder

SPEC_CLS = EmbeddingSpec("encoder", "bert", "cls", True, False)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embedding-models")
    make_tiny_bert(folder / "bge", pooling="cls")
    make_tiny_bert(folder / "minilm", pooling="mean", sentence_transformers=True, seed=3)
    make_tiny_bert(folder / "plain-bert", sentence_transformers=False, seed=5)
    make_tiny_qwen3_embedding(folder / "qwen3-embedding")
    make_tiny_model(folder / "chat")
    return folder


def load(root: Path, model_id: str) -> Any:
    return model_load.load(ModelRegistry([root], None, False).resolve(model_id))


# -- what the files say --------------------------------------------------------------------------------


def test_the_registry_tells_embedding_models_from_chat_models(root: Path) -> None:
    kinds = {e.id: e.kind for e in ModelRegistry([root], None, False).list()}
    assert kinds == {"bge": "embedding", "minilm": "embedding", "plain-bert": "embedding",
                     "qwen3-embedding": "embedding", "chat": "chat"}


def test_pooling_and_normalisation_come_from_sentence_transformers_files(root: Path, tmp_path: Path) -> None:
    assert read_spec(root / "bge") == EmbeddingSpec("encoder", "bert", "cls", True, False)
    assert read_spec(root / "minilm") == EmbeddingSpec("encoder", "bert", "mean", True, False)
    assert read_spec(root / "plain-bert") == EmbeddingSpec("encoder", "bert", "mean", True, False)  # the defaults
    assert read_spec(root / "qwen3-embedding") == EmbeddingSpec("decoder", "qwen3", "last", True, True)
    assert read_spec(root / "chat") is None
    modules = json.loads((root / "minilm" / "modules.json").read_text())
    (tmp_path / "config.json").write_text((root / "minilm" / "config.json").read_text())
    (tmp_path / "modules.json").write_text(json.dumps(modules[:2]))  # no Normalize module: vectors as pooled
    assert read_spec(tmp_path) == EmbeddingSpec("encoder", "bert", "mean", False, False)


def test_an_encoder_this_server_does_not_implement_is_refused_by_name(root: Path, tmp_path: Path) -> None:
    folder = make_tiny_bert(tmp_path / "nomic")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "nomic_bert",
                                                    "architectures": ["NomicBertModel"]}))
    entry = ModelRegistry([tmp_path], None, False).resolve("nomic")
    assert entry.kind == "embedding"  # so a chat request to it is refused as one
    with pytest.raises(EngineError) as refused:
        model_check.validate(entry)
    assert refused.value.code is EngineErrorCode.MODEL_UNSUPPORTED and "nomic_bert" in refused.value.message


# -- the BERT encoder --------------------------------------------------------------------------------------


def _layer_norm(x: np.ndarray[Any, Any], w: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * w + b


Array = np.ndarray[Any, Any]


def _numpy_bert(weights: dict[str, Array], ids: list[int], heads: int, layers: int) -> Array:
    """BERT's forward pass for one unpadded input, written out from the paper's equations in numpy."""
    from math import erf, sqrt

    w = weights
    h = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:len(ids)]
    h = _layer_norm(h + w["embeddings.token_type_embeddings.weight"][0], w["embeddings.LayerNorm.weight"],
                    w["embeddings.LayerNorm.bias"])
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))
    for i in range(layers):
        p = f"encoder.layer.{i}."

        def dense(x: np.ndarray[Any, Any], name: str, p: str = p) -> np.ndarray[Any, Any]:
            return x @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (dense(h, f"attention.self.{n}") for n in ("query", "key", "value"))
        size = h.shape[1] // heads
        context = []
        for head in range(heads):
            cut = slice(head * size, (head + 1) * size)
            scores = q[:, cut] @ k[:, cut].T / np.sqrt(size)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            context.append(scores / scores.sum(-1, keepdims=True) @ v[:, cut])
        h = _layer_norm(dense(np.concatenate(context, -1), "attention.output.dense") + h,
                        w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
        h = _layer_norm(dense(gelu(dense(h, "intermediate.dense")), "output.dense") + h,
                        w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    return h


def test_the_bert_encoder_matches_an_independent_forward_pass_with_padding_masked(root: Path) -> None:
    artifacts = load(root, "minilm")
    weights = {k: np.array(v) for k, v in mx.load(str(root / "minilm" / "model.safetensors")).items()}  # type: ignore[union-attr]
    texts = ("hello world", "the water was cold and the night was long", "a")
    ids = embeddings.tokenize(artifacts.tokenizer, texts, 128, "minilm")
    assert ids[0][0] == 2 and ids[0][-1] == 3  # [CLS] ... [SEP]
    hidden, mask, _ = embeddings.forward(artifacts.model, SPEC_CLS, ids)  # one padded pass
    for row, tokens in enumerate(ids):
        expected = _numpy_bert(weights, tokens, heads=4, layers=2)
        np.testing.assert_allclose(np.array(hidden[row, :len(tokens)]), expected, atol=2e-5)
    assert np.array(mask).sum(axis=1).tolist() == [len(t) for t in ids]


# -- pooling, truncation, batching ---------------------------------------------------------------------------


def test_pooling_takes_the_first_the_mean_or_the_last_real_token() -> None:
    hidden = mx.array([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]], [[0.0, 4.0], [2.0, 2.0], [4.0, 0.0]]])
    mask = mx.array([[1, 1, 0], [1, 1, 1]])
    lengths = mx.array([2, 3])
    assert embeddings.pool(hidden, mask, lengths, "cls").tolist() == [[1.0, 0.0], [0.0, 4.0]]
    assert embeddings.pool(hidden, mask, lengths, "mean").tolist() == [[2.0, 1.0], [2.0, 2.0]]  # padding left out
    assert embeddings.pool(hidden, mask, lengths, "last").tolist() == [[3.0, 2.0], [4.0, 0.0]]


def test_truncation_keeps_the_first_dimensions_then_renormalises() -> None:
    pooled = mx.array([[3.0, 4.0, 12.0]])
    np.testing.assert_allclose(np.array(embeddings.finish(pooled, 2, normalize=True)), [[0.6, 0.8]], rtol=1e-6)
    assert embeddings.finish(pooled, 3, normalize=False).tolist() == [[3.0, 4.0, 12.0]]


def test_dimensions_are_checked_against_the_model() -> None:
    matryoshka = EmbeddingSpec("decoder", "qwen3", "last", True, True)
    assert embeddings.check_dimensions(matryoshka, "m", 64, None) == 64
    assert embeddings.check_dimensions(matryoshka, "m", 64, 16) == 16
    assert embeddings.check_dimensions(SPEC_CLS, "m", 64, 64) == 64
    for spec, asked in ((SPEC_CLS, 16), (matryoshka, 65)):
        with pytest.raises(EngineError) as refused:
            embeddings.check_dimensions(spec, "m", 64, asked)
        assert refused.value.param == "dimensions" and refused.value.code is EngineErrorCode.INVALID_REQUEST


def test_batches_group_by_length_within_the_token_and_row_bounds() -> None:
    lengths = [5, 100, 3, 100, 7, 1]
    groups = embeddings.batches(lengths, max_tokens=210, max_rows=3)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for group in groups:
        assert len(group) <= 3 and len(group) * max(lengths[i] for i in group) <= 210
    assert groups[0] == [5, 2, 0]  # the shortest first: little padding
    assert embeddings.batches([300], max_tokens=210) == [[0]]  # too long for a pass: alone
    assert len(embeddings.batches([8] * 256)) == 1  # 256 short inputs: one pass


def test_context_overflow_names_the_input() -> None:
    class Tokenizer:
        def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]:
            return {"input_ids": [[1] * len(t) for t in texts]}

    with pytest.raises(EngineError) as refused:
        embeddings.tokenize(Tokenizer(), ("ab", "abcdef"), 4, "m")
    assert refused.value.code is EngineErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert "input[1] is 6 tokens" in refused.value.message


# -- Qwen3-Embedding ------------------------------------------------------------------------------------------


def test_qwen3_embedding_is_the_last_tokens_state_of_mlx_lms_qwen3_and_padding_changes_nothing(root: Path) -> None:
    artifacts = load(root, "qwen3-embedding")
    spec = read_spec(root / "qwen3-embedding")
    assert spec is not None
    texts = ("hello world", "a longer input with more words in it than the first", "x")
    ids = embeddings.tokenize(artifacts.tokenizer, texts, None, "qwen3-embedding")
    assert all(row[-1] == artifacts.tokenizer.convert_tokens_to_ids("<|endoftext|>") for row in ids)
    batched = embeddings.embed(artifacts.model, spec, ids, 64)
    # The same weights in mlx-lm's own qwen3, each input alone: the last position's normalised hidden state.
    config = json.loads((root / "qwen3-embedding" / "config.json").read_text())
    reference = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    weights = mx.load(str(root / "qwen3-embedding" / "model.safetensors"))
    reference.load_weights([(f"model.{k}", v) for k, v in weights.items()])  # type: ignore[union-attr]
    for row, tokens in enumerate(ids):
        last = reference.model(mx.array([tokens]))[0, -1]
        np.testing.assert_allclose(batched[row], np.array(last / mx.linalg.norm(last)), atol=2e-6)
    short = embeddings.embed(artifacts.model, spec, ids, 16)
    np.testing.assert_allclose(short, batched[:, :16] / np.linalg.norm(batched[:, :16], axis=1, keepdims=True),
                               atol=2e-6)
    assert len(tree_flatten(artifacts.model.parameters())) == len(weights)  # no lm_head held


# -- the Embed commands on the MLX thread -----------------------------------------------------------------


@pytest.fixture
def queue(root: Path) -> Iterator[tuple[embeddings.EmbedRequests, list[Event], Residency]]:
    cache = Residency(ModelRegistry([root], None, False), 1 << 30, 30.0, events=Recorder(), warmup=False)
    events: list[Event] = []
    passes: list[int] = []
    yield embeddings.EmbedRequests(cache, events.append, lambda: passes.append(1)), events, cache
    cache.clear()


def _run(queue: embeddings.EmbedRequests, cache: Residency) -> None:
    """The worker's loop, reduced: a load's piece, then the waiting embeds (the load reads on its thread)."""
    deadline = time.monotonic() + 30
    while len(queue) or cache.is_loading():
        assert time.monotonic() < deadline, "the embeds were never answered"
        cache.advance((), idle=True)
        queue.step(())
        time.sleep(0.01)


def test_an_embed_waits_for_its_models_load_then_is_answered_once(
    queue: tuple[embeddings.EmbedRequests, list[Event], Residency]
) -> None:
    requests, events, cache = queue
    requests.submit(Embed("e1", "bge", ("hello", "world"), None))
    assert requests.ready()  # not loading yet: the loop must not sleep
    requests.step(())
    assert events == [Loading("e1", "bge")] and not requests.ready()
    _run(requests, cache)
    started, answer = events[1:]
    assert isinstance(started, Started) and isinstance(answer, Embedded)
    assert answer.dimensions == 64 and len(answer.vectors) == 2 * 64 * 4
    assert started.prompt_tokens == answer.prompt_tokens == 6  # [CLS] hello [SEP], [CLS] world [SEP]
    requests.submit(Embed("e2", "bge", ("again",), None))
    requests.step(())  # loaded: answered in this pass, no Loading
    assert [type(e) for e in events[3:]] == [Started, Embedded]


def test_an_embed_aborted_while_its_model_loads_is_forgotten(
    queue: tuple[embeddings.EmbedRequests, list[Event], Residency]
) -> None:
    requests, events, cache = queue
    requests.submit(Embed("e1", "qwen3-embedding", ("hello",), None))
    requests.step(())
    assert requests.abort("e1") and not requests.abort("e1") and not len(requests)
    assert isinstance(events[-1], Failed)
    _run(requests, cache)
    assert not any(isinstance(e, Embedded) for e in events)


def test_an_embed_of_a_chat_model_or_with_bad_dimensions_fails_with_its_reason(
    queue: tuple[embeddings.EmbedRequests, list[Event], Residency]
) -> None:
    requests, events, cache = queue
    requests.submit(Embed("e1", "bge", ("x",), 8))
    requests.submit(Embed("e2", "missing", ("x",), None))
    requests.submit(Embed("e3", "chat", ("x",), None))
    _run(requests, cache)
    failures = {e.request_id: e for e in events if isinstance(e, Failed)}
    assert failures["e1"].param == "dimensions" and failures["e2"].code == EngineErrorCode.MODEL_NOT_FOUND.value
    assert failures["e3"].param == "model" and "'chat' is a chat model" in failures["e3"].message


def test_requests_ready_in_one_pass_share_their_models_forward_pass(root: Path) -> None:
    cache = Residency(ModelRegistry([root], None, False), 1 << 30, 30.0, events=Recorder(), warmup=False)
    events: list[Event] = []
    passes: list[int] = []
    requests = embeddings.EmbedRequests(cache, events.append, lambda: passes.append(1), piece_s=0)  # fixed passes
    try:
        for rid, text in (("a", "hello world"), ("b", "the sea"), ("c", "a dog ran home")):
            requests.submit(Embed(rid, "bge", (text,), None))
        requests.submit(Embed("d", "qwen3-embedding", ("the sea",), 16))
        _run(requests, cache)
        answers = {e.request_id: e for e in events if isinstance(e, Embedded)}
        assert sorted(answers) == ["a", "b", "c", "d"] and len(passes) == 2  # one pass per model
        alone = embeddings.EmbedRequests(cache, events.append, lambda: None)
        alone.submit(Embed("b2", "bge", ("the sea",), None))
        alone.step(())
        single = events[-1]
        assert isinstance(single, Embedded) and single.prompt_tokens == answers["b"].prompt_tokens
        np.testing.assert_allclose(np.frombuffer(single.vectors, "<f4"), np.frombuffer(answers["b"].vectors, "<f4"),
                                   atol=2e-6)
        assert answers["d"].dimensions == 16 and len(answers["d"].vectors) == 16 * 4
    finally:
        cache.clear()


def test_passes_are_paced_to_the_devices_speed_and_every_pass_moves_the_progress_counter(root: Path) -> None:
    artifacts = load(root, "bge")
    spec = read_spec(root / "bge")
    assert spec is not None
    ids = embeddings.tokenize(artifacts.tokenizer, tuple(f"word {i} and more" for i in range(64)), None, "bge")
    passes: list[int] = []
    pacer = PrefillPacer(embeddings.MAX_BATCH_TOKENS, 1.0)
    paced = embeddings.embed(artifacts.model, spec, ids, 64, lambda: passes.append(1), pacer)
    assert len(passes) > 1 and pacer.size > 16  # started small (16 tokens), grew with each quick pass
    np.testing.assert_allclose(paced, embeddings.embed(artifacts.model, spec, ids, 64), atol=2e-6)


def test_a_decoders_input_longer_than_a_pass_runs_in_pieces_through_a_kv_cache(root: Path) -> None:
    artifacts = load(root, "qwen3-embedding")
    spec = read_spec(root / "qwen3-embedding")
    assert spec is not None
    text = " ".join(["the weather is fine and the river runs north"] * 6)
    ids = embeddings.tokenize(artifacts.tokenizer, (text, "short"), None, "qwen3-embedding")
    assert len(ids[0]) > 40
    passes: list[int] = []
    pieces = embeddings.embed(artifacts.model, spec, ids, 64, lambda: passes.append(1), PrefillPacer.fixed(16))
    assert len(passes) >= len(ids[0]) // 16 + 1  # every piece moved the progress counter
    np.testing.assert_allclose(pieces, embeddings.embed(artifacts.model, spec, ids, 64), atol=2e-5)
