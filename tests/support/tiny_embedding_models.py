"""Tiny embedding model folders of the real layouts, made offline in a second: random weights, real shapes.

- `make_tiny_bert`: a BERT encoder as bge / all-MiniLM / e5 ship it: config.json `BertModel`, Hugging Face's
  weight names (pooler included, as in the checkpoints), a WordPiece tokenizer (lowercasing, [CLS] ... [SEP])
  made with `tokenizers`, and sentence-transformers' modules.json, 1_Pooling/config.json and Normalize.
- `make_tiny_qwen3_embedding`: Qwen3-Embedding's shape: mlx-lm's qwen3 model with tied embeddings, saved as
  the sentence-transformers checkpoint holds it (the bare decoder: `layers.0...`, no `model.` prefix), a
  byte-level BPE whose post-processor appends <|endoftext|>, last-token pooling, Normalize.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Literal

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tests.support.tiny_models import COMMON_WORDS, json_corpus

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _write_modules(path: Path, pooling: Literal["cls", "mean", "last"], width: int, normalize: bool = True) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": width,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_lasttoken": pooling == "last",
    }, indent=2))


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, mx.array]:
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    weights = {}
    for index, (name, shape) in enumerate(sorted(shapes.items())):
        if name.endswith("LayerNorm.weight"):
            weights[name] = mx.ones(shape)
        elif name.endswith(("LayerNorm.bias", ".bias")):
            weights[name] = mx.zeros(shape)
        else:
            weights[name] = mx.random.normal(shape, key=keys[index]) * 0.05
    return weights


def bert_vocabulary(size: int) -> list[str]:
    words = list(dict.fromkeys(w for w in COMMON_WORDS.split() if len(w) > 1))
    vocab = BERT_SPECIALS + list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    vocab += words[: max(0, size - len(vocab))]
    return vocab + [f"w{i}" for i in range(size - len(vocab))]  # synthetic words up to a real vocabulary's size


def make_tiny_bert(
    path: Path,
    *,
    pooling: Literal["cls", "mean"] = "cls",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 128,
    context: int = 128,
    vocab_size: int = 600,
    sentence_transformers: bool = True,
    seed: int = 0,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(bert_vocabulary(vocab_size))}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
        mask_token="[MASK]", model_max_length=context,
    )
    fast.save_pretrained(str(path))
    config = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(vocab), "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": intermediate,
        "hidden_act": "gelu", "max_position_embeddings": context, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 0, "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (len(vocab), hidden),
        "embeddings.position_embeddings.weight": (context, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
        "embeddings.LayerNorm.weight": (hidden,), "embeddings.LayerNorm.bias": (hidden,),
        "pooler.dense.weight": (hidden, hidden), "pooler.dense.bias": (hidden,),  # in the checkpoints, unused
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (hidden, hidden), (hidden,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (intermediate, hidden), (
            intermediate,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (hidden, intermediate), (hidden,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (hidden,), (hidden,)
    mx.save_safetensors(str(path / "model.safetensors"), _random(shapes, seed), metadata={"format": "pt"})
    if sentence_transformers:
        _write_modules(path, pooling, hidden)
    return path


def make_tiny_qwen3_embedding(path: Path, *, layers: int = 2, hidden: int = 64, context: int = 256,
                              seed: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    end = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[end, "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(json_corpus(60), trainer)
    # Qwen3-Embedding's tokenizer closes every input with <|endoftext|>, the token whose state is the vector.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {end}", pair=f"$A {end} $B:1 {end}:1", special_tokens=[(end, tokenizer.token_to_id(end))],
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, eos_token=end, pad_token=end, model_max_length=context,
    )
    fast.save_pretrained(str(path))
    vocab_size = tokenizer.get_vocab_size()
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": hidden * 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": hidden // 4, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": context, "tie_word_embeddings": True,
        "eos_token_id": tokenizer.token_to_id(end), "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(seed)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    weights = {name.removeprefix("model."): value for name, value in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})  # type: ignore[arg-type]
    _write_modules(path, "last", hidden)
    return path
