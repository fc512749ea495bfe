"""The tiny-model factory makes a folder mlx-lm loads and generates from; each damage helper breaks it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.utils import load_tokenizer as _load_tokenizer

from tests.support import tiny_models

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the name of this model?"},
    {"role": "assistant", "content": "model"},
    {"role": "tool", "content": "42"},
    {"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
]


def load(path: Path) -> tuple[Any, Any]:
    model, tokenizer = mlx_lm.load(str(path))[:2]
    return model, tokenizer


def load_tokenizer(path: Path) -> Any:
    return _load_tokenizer(path)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return tiny_models.copy_model(tiny_model, tmp_path / "model")


def test_folder_has_the_files_of_a_checkpoint(tiny_model: Path) -> None:
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", *tiny_models.TOKENIZER_FILES} <= names
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["max_position_embeddings"] == 512
    assert "chat_template" in json.loads((tiny_model / "tokenizer_config.json").read_text())


def test_loads_and_streams_text(tiny_model: Path) -> None:
    model, tokenizer = load(tiny_model)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|assistant|>")
    pieces = [r.text for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=8)]
    assert "".join(pieces).strip()
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids(t) for t in ("<|eos|>", "<|end|>")}


def test_batch_generate(tiny_model: Path) -> None:
    model, tokenizer = load(tiny_model)
    prompts = [
        tokenizer.encode("hello world"),
        tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True),
    ]
    result = mlx_lm.batch_generate(model, tokenizer, prompts, max_tokens=4)
    assert len(result.texts) == 2


def test_tokenizer_round_trips_known_words(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer.encode("Hello, the model can write 42 words!")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello, the model can write 4 2 words!"


@pytest.mark.parametrize("vocab_size", [300, 128256])
def test_vocabulary_has_exactly_vocab_size_entries(tmp_path: Path, vocab_size: int) -> None:
    tiny_models.make_tiny_model(tmp_path, hidden_size=16, num_layers=1, intermediate_size=32, vocab_size=vocab_size)
    tokenizer = load_tokenizer(tmp_path)
    assert len(tokenizer.get_vocab()) == vocab_size


def test_bpe_tokenizer_round_trips_json_in_json_sized_pieces(tmp_path: Path) -> None:
    tiny_models.make_tiny_model(tmp_path, tokenizer="bpe", vocab_size=512)
    tokenizer = load_tokenizer(tmp_path)
    text = '{"name": "Hello world", "values": [1, 2.5, true, null]}'
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: exact, case kept
    pieces = set(tokenizer._tokenizer.convert_ids_to_tokens(ids))
    assert {'{"', '":'} <= pieces  # learnt from the JSON corpus, as a real BPE has them
    assert len(tokenizer.get_vocab()) == 512
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)[-2:] == (
        tokenizer.encode("<|assistant|>\n", add_special_tokens=False)
    )


def test_bpe_tokenizer_smaller_than_the_embedding(tmp_path: Path) -> None:
    tiny_models.make_tiny_model(tmp_path, tokenizer="bpe", vocab_size=576, tokenizer_vocab_size=500)
    model, tokenizer = load(tmp_path)
    assert len(tokenizer.get_vocab()) == 500
    assert model.model.embed_tokens.weight.shape[0] == 576
    assert model(mx.array([[1, 2, 3]])).shape[-1] == 576


def test_bfloat16(tmp_path: Path) -> None:
    tiny_models.make_tiny_model(tmp_path, dtype="bfloat16")
    model, _ = load(tmp_path)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16


Damage = Callable[[Path], Path]

LOAD_FAILURES: list[tuple[Damage, type[BaseException]]] = [
    (tiny_models.remove_config, FileNotFoundError),
    (tiny_models.write_invalid_config_json, json.JSONDecodeError),
    (tiny_models.set_model_type, ValueError),
    (tiny_models.mismatch_shapes, ValueError),
    (tiny_models.remove_weights, FileNotFoundError),
    (tiny_models.truncate_weights, RuntimeError),
    (tiny_models.corrupt_safetensors_header, RuntimeError),
    (lambda p: tiny_models.corrupt_safetensors_header(p, "huge_length"), RuntimeError),
    (tiny_models.replace_weights_with_directory, RuntimeError),
    (tiny_models.replace_weights_with_dangling_symlink, RuntimeError),
    (tiny_models.remove_tokenizer, ValueError),
    (tiny_models.break_tokenizer, json.JSONDecodeError),
]


@pytest.mark.parametrize(("damage", "error"), LOAD_FAILURES, ids=lambda v: getattr(v, "__name__", ""))
def test_damage_makes_load_fail(model_copy: Path, damage: Damage, error: type[BaseException]) -> None:
    assert damage(model_copy) == model_copy
    with pytest.raises(error):
        load(model_copy)


def test_remove_chat_template_leaves_a_base_model(model_copy: Path) -> None:
    tiny_models.remove_chat_template(model_copy)
    _, tokenizer = load(model_copy)
    assert not tokenizer.has_chat_template


# ---- byte-level BPE and real chat formats ----------------------------------------------------------------

FORMATS = {
    # format: (special tokens that must be single special tokens, added non-special tokens, stop tokens)
    "qwen2.5": (("<|im_start|>", "<|im_end|>", "<|endoftext|>"), ("<tool_call>", "</tool_call>"),
                {"<|im_end|>", "<|endoftext|>"}),
    "qwen3": (("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
              ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
              {"<|im_end|>", "<|endoftext|>"}),
    "llama3.1": (("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"), (), {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"}),
    "mistral": (("<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
                 "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), (), {"</s>"}),
}


@pytest.fixture(scope="module")
def format_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {fmt: tiny_models.make_tiny_model(root / fmt, chat_format=fmt) for fmt in FORMATS}  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tokenizer(tiny_models.make_tiny_model(tmp_path_factory.mktemp("bytes") / "m", tokenizer="bytes"))


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_the_byte_level_tokenizer_round_trips_any_text(byte_tokenizer: Any, text: str) -> None:
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    assert byte_tokenizer.decode(ids) == text


def test_json_round_trips_through_encode_and_the_streaming_detokenizer(byte_tokenizer: Any) -> None:
    text = json.dumps({"city": 'Zürich "HB" {}[]', "n": [1, -2.5e3, None, True], "emoji": "😀"}, ensure_ascii=False)
    detokenizer = byte_tokenizer.detokenizer
    for token in byte_tokenizer.encode(text, add_special_tokens=False):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == text


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_format_carries_its_published_template_and_its_tokens(format_models: dict[str, Path], fmt: str) -> None:
    special, added, stops = FORMATS[fmt]
    model, tokenizer = load(format_models[fmt])
    assert tokenizer.chat_template == tiny_models.chat_template(fmt)  # type: ignore[arg-type]
    for token in (*special, *added):
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token, token
    for token in added:  # Qwen2.5's <tool_call> pair: added, but not special (it survives skip_special_tokens)
        assert tokenizer.decode(tokenizer.encode(token, add_special_tokens=False), skip_special_tokens=True) == token
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids(t) for t in stops}
    assert len(tokenizer.get_vocab()) == 512
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    pieces = [r.text for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=4)]
    assert len(pieces) >= 1


def test_a_byte_level_vocabulary_too_small_for_its_bytes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least"):
        tiny_models.make_tiny_model(tmp_path, chat_format="llama3.1", vocab_size=200)
