"""Small synthetic Llama GGUF files, written with llama.cpp's own Python package (`gguf`), to test the
converter against: known weights in Hugging Face's layout go in (Q/K permuted the way llama.cpp's
convert_hf_to_gguf.py does), and the converted folder must give them back.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, as that script describes it: per head, view the
    rows as (2 halves, head_dim/2) and swap those two axes, so each rotated pair becomes adjacent rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (the 256 base tokens of a byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[str]]:
    """Special tokens, the 256 byte tokens, and a few merges (`Ġt`, `he`, `Ġthe`)."""
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = [*SPECIAL, *byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    return tokens, merges


def hf_model(vocab_size: int, seed: int = 0) -> llama.Model:
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(model_type="llama", vocab_size=vocab_size, tie_word_embeddings=True,
                                        **SHAPE))
    # random weights of a sensible scale (the default init leaves norms at 1, fine)
    params = {k: (mx.random.normal(v.shape) * 0.2 if v.ndim == 2 else v) for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(params.items()))
    mx.eval(model.parameters())
    return model


def gguf_tensors(model: llama.Model) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, Q and K permuted as llama.cpp stores them."""
    out = {}
    for name, value in tree_flatten(model.parameters()):
        array = np.array(value.astype(mx.float32))
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = array
        elif name == "model.norm.weight":
            out["output_norm.weight"] = array
        else:
            _, _, layer, *module, _ = name.split(".")
            short = GGUF_NAMES[module[-1]]
            if short == "attn_q":
                array = llama_cpp_permute(array, SHAPE["num_attention_heads"])
            elif short == "attn_k":
                array = llama_cpp_permute(array, SHAPE["num_key_value_heads"])
            out[f"blk.{layer}.{short}.weight"] = array
    return out


def write_gguf(path: Path, tensors: dict[str, np.ndarray], *, matrix_type: str = "F32", embed_type: str = "F32",
               pre: str = "smollm") -> Path:
    """A Llama GGUF of these tensors: 2-D ones stored as matrix_type (token_embd as embed_type), 1-D as F32."""
    tokens, merges = vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(SHAPE["num_hidden_layers"])
    writer.add_context_length(SHAPE["max_position_embeddings"])
    writer.add_embedding_length(SHAPE["hidden_size"])
    writer.add_feed_forward_length(SHAPE["intermediate_size"])
    writer.add_head_count(SHAPE["num_attention_heads"])
    writer.add_head_count_kv(SHAPE["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(SHAPE["rms_norm_eps"])
    writer.add_rope_freq_base(SHAPE["rope_theta"])
    writer.add_rope_dimension_count(SHAPE["hidden_size"] // SHAPE["num_attention_heads"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML)
    for name, array in tensors.items():
        kind = embed_type if name == "token_embd.weight" else matrix_type if array.ndim == 2 else "F32"
        qtype = gguf.GGMLQuantizationType[kind]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array.astype(np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
