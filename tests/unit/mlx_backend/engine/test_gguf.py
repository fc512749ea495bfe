"""The GGUF -> mlx-lm converter, on small synthetic Llama GGUFs written with llama.cpp's own `gguf` package:
the header and quantized blocks are read as llama.cpp means them, names map to Hugging Face's, the Q/K
permutation is undone, the folder loads in mlx-lm and computes what the original weights compute, and what
MLX cannot read is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import gguf as gguf_py
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from mlx_backend.engine import gguf
from tests.support import gguf_files as gf


@pytest.fixture(scope="module")
def original() -> tuple[object, dict[str, np.ndarray]]:
    tokens, _ = gf.vocabulary()
    model = gf.hf_model(len(tokens))
    return model, gf.gguf_tensors(model)


def logits(model: object, ids: list[int]) -> np.ndarray:
    out = model(mx.array([ids]))  # type: ignore[operator]
    return np.array(out.astype(mx.float32))


PROMPT = [1, 40, 70, 100, 200, 259, 260, 261, 2]


# -- reading ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_mlx_reads_a_quantized_block_type_as_llama_cpp_means_it(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(8, 64)).astype(np.float32)
    path = gf.write_gguf(tmp_path / "q.gguf", {"token_embd.weight": values}, embed_type=kind)
    weights = mx.load(str(path))
    assert isinstance(weights, dict)
    assert gguf.tensor_types(path) == {"token_embd.weight": kind}
    bits = gguf._bits(weights["token_embd.weight"], weights["token_embd.scales"])
    assert bits == (8 if kind == "Q8_0" else 4)
    ours = mx.dequantize(weights["token_embd.weight"], weights["token_embd.scales"], weights["token_embd.biases"],
                         group_size=32, bits=bits)
    qtype = gguf_py.GGMLQuantizationType[kind]
    reference = gguf_py.quants.dequantize(gguf_py.quants.quantize(values, qtype), qtype)
    # MLX computes scale * q + bias in float16: rounding of scale * q (up to ~3 here) before adding the bias
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)), reference, rtol=0, atol=4e-3)


def test_a_type_mlx_cannot_read_is_refused_by_name_before_loading(tmp_path: Path) -> None:
    values = np.zeros((2, 256), dtype=np.float32)
    raw = np.zeros((2, 144), dtype=np.uint8)  # one Q4_K block (256 values) per row
    path = tmp_path / "k.gguf"
    writer = gguf_py.GGUFWriter(str(path), "llama")
    writer.add_tensor("output_norm.weight", values[0])
    writer.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=gguf_py.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf.GGUFError, match=r"Q4_K tensors \(e\.g\. blk\.0\.ffn_down\.weight: Q4_K\).*MLX cannot"):
        gguf.convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(gguf.GGUFError, match="not a GGUF file"):
        gguf.tensor_types(path)


# -- names, permutation -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ours", "hf"), [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("token_embd.scales", "model.embed_tokens.scales"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.biases", "lm_head.biases"),
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("blk.12.attn_k.scales", "model.layers.12.self_attn.k_proj.scales"),
    ("blk.3.attn_v.biases", "model.layers.3.self_attn.v_proj.biases"),
    ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
    ("blk.29.ffn_gate.weight", "model.layers.29.mlp.gate_proj.weight"),
    ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
    ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
    ("blk.1.attn_norm.weight", "model.layers.1.input_layernorm.weight"),
    ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
])
def test_llama_cpp_names_map_to_hugging_face_names(ours: str, hf: str) -> None:
    assert gguf.hf_name(ours) == hf


@pytest.mark.parametrize("name", ["blk.0.attn_qkv.weight", "rope_freqs.weight", "blk.0.attn_q.bias"])
def test_a_tensor_without_a_llama_counterpart_is_an_error(name: str) -> None:
    with pytest.raises(gguf.GGUFError):
        gguf.hf_name(name)


@pytest.mark.parametrize(("heads", "head_dim", "cols"), [(9, 64, 18), (3, 64, 72), (4, 16, 1), (2, 8, 5)])
def test_unpermute_undoes_llama_cpps_permute(heads: int, head_dim: int, cols: int) -> None:
    rows = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    permuted = gf.llama_cpp_permute(rows, heads)
    assert not np.array_equal(permuted, rows)
    np.testing.assert_array_equal(np.array(gguf.unpermute_rows(mx.array(permuted), heads)), rows)


def test_unpermute_moves_whole_rows_so_scales_and_biases_follow_their_weights() -> None:
    heads, head_dim = 2, 8
    row_ids = np.arange(heads * head_dim)
    restored = np.array(gguf.unpermute_rows(mx.array(gf.llama_cpp_permute(row_ids, heads)), heads))
    np.testing.assert_array_equal(restored, row_ids)  # a 1-D view of rows: same order for any per-row tensor


def test_rope_on_permuted_rows_interleaved_equals_rope_on_restored_rows_split_in_halves() -> None:
    """Why the permutation exists: llama.cpp rotates adjacent pairs (traditional RoPE), Hugging Face rotates
    i with i + d/2. After un-permuting, HF-style RoPE must give the attention scores llama.cpp computes."""
    rng = np.random.default_rng(1)
    heads, head_dim, hidden, seq = 3, 16, 48, 5
    wq, wk = (rng.normal(size=(heads * head_dim, hidden)).astype(np.float32) for _ in range(2))
    x = mx.array(rng.normal(size=(1, seq, hidden)).astype(np.float32))

    def scores(q_w: mx.array, k_w: mx.array, traditional: bool) -> np.ndarray:
        def project(w: mx.array) -> mx.array:
            y = (x @ w.T).reshape(1, seq, heads, head_dim).transpose(0, 2, 1, 3)
            return mx.fast.rope(y, head_dim, traditional=traditional, base=10000.0, scale=1.0, offset=0)
        return np.array(project(q_w) @ project(k_w).transpose(0, 1, 3, 2))

    llama_cpp = scores(mx.array(gf.llama_cpp_permute(wq, heads)), mx.array(gf.llama_cpp_permute(wk, heads)), True)
    restored = scores(gguf.unpermute_rows(mx.array(gf.llama_cpp_permute(wq, heads)), heads),
                      gguf.unpermute_rows(mx.array(gf.llama_cpp_permute(wk, heads)), heads), False)
    np.testing.assert_allclose(restored, llama_cpp, rtol=1e-4, atol=1e-4)


# -- the folder ---------------------------------------------------------------------------------------------

def test_a_float32_gguf_converts_to_a_folder_that_computes_what_the_original_model_computes(
        tmp_path: Path, original: tuple[object, dict[str, np.ndarray]]) -> None:
    model, tensors = original
    folder = gguf.convert(gf.write_gguf(tmp_path / "f32.gguf", tensors), tmp_path / "out", dtype="float32")
    converted, _ = load(str(folder))
    np.testing.assert_allclose(logits(converted, PROMPT), logits(model, PROMPT), rtol=1e-4, atol=1e-4)


def test_the_config_carries_the_gguf_shape_and_context(tmp_path: Path,
                                                       original: tuple[object, dict[str, np.ndarray]]) -> None:
    _, tensors = original
    folder = gguf.convert(gf.write_gguf(tmp_path / "f32.gguf", tensors), tmp_path / "out", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    tokens, _ = gf.vocabulary()
    assert {k: config[k] for k in gf.SHAPE} == pytest.approx(gf.SHAPE)
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == len(tokens)
    assert config["head_dim"] == 16
    assert config["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert "quantization" not in config


def test_a_quantized_gguf_keeps_its_bits_per_module_and_matches_its_dequantized_twin(
        tmp_path: Path, original: tuple[object, dict[str, np.ndarray]]) -> None:
    _, tensors = original
    path = gf.write_gguf(tmp_path / "q.gguf", tensors, matrix_type="Q4_1", embed_type="Q8_0")
    quantized = gguf.convert(path, tmp_path / "q4", dtype="quantized")
    plain = gguf.convert(path, tmp_path / "f32", dtype="float32")
    config = json.loads((quantized / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine",
                                      "model.embed_tokens": {"group_size": 32, "bits": 8}}
    q_model, _ = load(str(quantized))
    f_model, _ = load(str(plain))
    assert q_model.model.layers[0].self_attn.q_proj.bits == 4
    assert q_model.model.embed_tokens.bits == 8
    ours, twin = logits(q_model, PROMPT), logits(f_model, PROMPT)
    # the same numbers; the quantized folder computes in float16 (its scales' type), the twin in float32
    assert np.abs(ours - twin).max() < 0.02 * np.abs(twin).max()
    np.testing.assert_array_equal(ours.argmax(-1), twin.argmax(-1))


def test_the_quantized_folder_is_close_to_the_unquantized_original(
        tmp_path: Path, original: tuple[object, dict[str, np.ndarray]]) -> None:
    model, tensors = original
    path = gf.write_gguf(tmp_path / "q.gguf", tensors, matrix_type="Q8_0", embed_type="Q8_0")
    converted, _ = load(str(gguf.convert(path, tmp_path / "q8", dtype="float32")))
    ours, theirs = logits(converted, PROMPT), logits(model, PROMPT)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999  # 8-bit: the same model up to rounding


# -- the tokenizer ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, original: tuple[object, dict[str, np.ndarray]]) -> object:
    tmp = tmp_path_factory.mktemp("tok")
    _, tensors = original
    folder = gguf.convert(gf.write_gguf(tmp / "t.gguf", tensors), tmp / "out", dtype="float32")
    _, tok = load(str(folder))
    return tok


@pytest.mark.parametrize("text", ["the theme", "naïve café ☕ 東京", "def f(x):\n\treturn x  # ok", "  spaces  "])
def test_the_rebuilt_byte_level_bpe_round_trips_any_text(tokenizer: object, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    assert tokenizer.decode(ids) == text  # type: ignore[attr-defined]


def test_the_merges_apply(tokenizer: object) -> None:
    tokens, _ = gf.vocabulary()
    assert tokenizer.encode(" the", add_special_tokens=False) == [tokens.index("Ġthe")]  # type: ignore[attr-defined]


def test_digits_are_split_one_by_one(tokenizer: object) -> None:
    ids = tokenizer.encode("2024", add_special_tokens=False)  # type: ignore[attr-defined]
    assert [tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]  # type: ignore[attr-defined]


def test_special_tokens_stay_whole_and_the_chat_template_is_the_files(tokenizer: object) -> None:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],  # type: ignore[attr-defined]
                                         add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    assert ids[0] == 1 and ids.count(2) == 1
    assert tokenizer.eos_token == "<|im_end|>"  # type: ignore[attr-defined]


def test_an_unsupported_pre_tokenizer_is_refused_by_name(tmp_path: Path,
                                                         original: tuple[object, dict[str, np.ndarray]]) -> None:
    _, tensors = original
    with pytest.raises(gguf.GGUFError, match="pre-tokenizer 'qwen2'"):
        gguf.convert(gf.write_gguf(tmp_path / "t.gguf", tensors, pre="qwen2"), tmp_path / "out")
