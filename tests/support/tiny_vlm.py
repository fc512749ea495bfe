"""Tiny vision-language model folders that mlx-vlm loads like any checkpoint, made offline in seconds.

Qwen2-VL's shape (`qwen2_vl`: a ViT with 2x2 patch merging, an mRoPE Qwen2 decoder), random weights, the
family's real chat template (tests/support/chat_templates/qwen2-vl-instruct.jinja, see SOURCES.md) and its
special tokens under their real names on a byte-level BPE, and the image processor's config the
Qwen2-VL processor reads. Images are cut into 14-pixel patches merged 2x2: a 56x56 image is 4 image tokens,
112x112 is 16. A random model cannot see, but its output depends on the pixels (its weights are scaled up so greedy
decoding shows it), which is what tests use.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from transformers import PreTrainedTokenizerFast

from tests.support.tiny_models import CHAT_TEMPLATES_DIR, WEIGHTS_FILE, _byte_level_bpe, _Format, _random_weights

QWEN2_VL_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
_QWEN2_VL = _Format("qwen2-vl-instruct.jinja", QWEN2_VL_SPECIAL, None, "<|im_end|>", ("<|im_end|>", "<|endoftext|>"),
                    False, pad="<|endoftext|>")
IMAGE_TOKEN = "<|image_pad|>"
PATCH = 14
MERGE = 2


def make_tiny_qwen2_vl(path: Path, *, vocab_size: int = 1024, context_length: int = 4096, seed: int = 0,
                       max_pixels: int = 112 * 112) -> Path:
    """Write a random Qwen2-VL folder at `path`. `max_pixels` bounds an image's size after the processor's
    resize (Qwen2-VL resizes to a multiple of 28 within [min_pixels, max_pixels]): 112*112 is 16 tokens."""
    from mlx_vlm.models import qwen2_vl

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_bpe(_QWEN2_VL, vocab_size)
    vocab = tokenizer.get_vocab()
    template = (CHAT_TEMPLATES_DIR / "qwen2-vl-instruct.jinja").read_text()
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in QWEN2_VL_SPECIAL if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=context_length, chat_template=template,
    )
    fast.save_pretrained(str(path), save_jinja_files=False)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}) + "\n")
    hidden, heads = 64, 4  # head_dim 16 = 2 * sum(mrope_section)
    config: dict[str, object] = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": vocab_size,
        "max_position_embeddings": context_length,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": [vocab[t] for t in _QWEN2_VL.stop],
        "image_token_id": vocab[IMAGE_TOKEN],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
        "vision_token_id": vocab["<|vision_pad|>"],
        "torch_dtype": "float32",
        "vision_config": {
            "depth": 1, "embed_dim": 32, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2,
            "in_chans": 3, "in_channels": 3, "patch_size": PATCH, "spatial_patch_size": PATCH,
            "spatial_merge_size": MERGE, "temporal_patch_size": 2,
        },
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model_config = qwen2_vl.ModelConfig.from_dict(json.loads(json.dumps(config)))
    model_config.vision_config = qwen2_vl.VisionConfig.from_dict(config["vision_config"])
    model_config.text_config = qwen2_vl.TextConfig.from_dict(config)
    model = qwen2_vl.Model(model_config)
    # Four times the usual scale: a flatter random model answers every image alike under greedy decoding;
    # this one's output changes with the pixels (what the tests check), and stays finite.
    weights = {name: w * 4 if w.ndim > 1 else w
               for name, w in _random_weights(dict(tree_flatten(model.parameters())), mx.float32, seed).items()}
    mx.save_safetensors(str(path / WEIGHTS_FILE), weights, {"format": "mlx"})
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": (PATCH * MERGE) ** 2, "max_pixels": max_pixels,
        "patch_size": PATCH, "temporal_patch_size": 2, "merge_size": MERGE,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return path


GEMMA3_SPECIAL = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
    "<image_soft_token>",
)
_GEMMA3 = _Format("gemma3-it.jinja", GEMMA3_SPECIAL, "<bos>", "<eos>", ("<eos>", "<end_of_turn>"), True,
                  unk="<unk>", pad="<pad>")
GEMMA3_IMAGE_SIDE = 56  # every image is resized to this square (Gemma 3: 896)
GEMMA3_IMAGE_TOKENS = 4  # per image, pooled from (56/14)^2 patches (Gemma 3: 256)


def make_tiny_gemma3(path: Path, *, vocab_size: int = 1024, context_length: int = 4096, seed: int = 0) -> Path:
    """Write a random Gemma 3 folder at `path`: a SigLIP vision tower, average pooling to a fixed number of tokens
    per image, a Gemma 3 decoder with sliding and global layers; the family's chat template and special tokens
    (on a byte-level BPE: Gemma's own tokenizer is SentencePiece, whose vocabulary a test need not have)."""
    from mlx_vlm.models import gemma3

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_bpe(_GEMMA3, vocab_size)
    vocab = tokenizer.get_vocab()
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                                   "<image_soft_token>"],
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        model_max_length=context_length, chat_template=(CHAT_TEMPLATES_DIR / "gemma3-it.jinja").read_text(),
        add_bos_token=True,
    )
    fast.save_pretrained(str(path), save_jinja_files=False)
    text_config: dict[str, object] = {
        "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
        "vocab_size": vocab_size, "sliding_window": 64, "sliding_window_pattern": 2,
        "mm_tokens_per_image": GEMMA3_IMAGE_TOKENS, "max_position_embeddings": context_length,
        "rms_norm_eps": 1e-6, "rope_global_base_freq": 1000000.0, "rope_local_base_freq": 10000.0,
    }
    vision_config: dict[str, object] = {
        "model_type": "siglip_vision_model", "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
        "num_attention_heads": 2, "patch_size": PATCH, "image_size": GEMMA3_IMAGE_SIDE,
    }
    config: dict[str, object] = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text_config, "vision_config": vision_config,
        "mm_tokens_per_image": GEMMA3_IMAGE_TOKENS, "image_token_index": vocab["<image_soft_token>"],
        "boi_token_index": vocab["<start_of_image>"], "eoi_token_index": vocab["<end_of_image>"],
        "eos_token_id": [vocab[t] for t in _GEMMA3.stop], "bos_token_id": vocab["<bos>"],
        "pad_token_id": vocab["<pad>"], "vocab_size": vocab_size, "hidden_size": 64, "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model_config = gemma3.ModelConfig.from_dict(json.loads(json.dumps(config)))
    model_config.text_config = gemma3.TextConfig.from_dict(text_config)
    model_config.vision_config = gemma3.VisionConfig.from_dict(vision_config)
    model = gemma3.Model(model_config)
    weights = {name: w * 4 if w.ndim > 1 else w  # as for Qwen2-VL: the output follows the pixels
               for name, w in _random_weights(dict(tree_flatten(model.parameters())), mx.float32, seed).items()}
    mx.save_safetensors(str(path / WEIGHTS_FILE), weights, {"format": "mlx"})
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
        "size": {"height": GEMMA3_IMAGE_SIDE, "width": GEMMA3_IMAGE_SIDE}, "resample": 2,
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_pan_and_scan": False,
    }, indent=2) + "\n")
    (path / "processor_config.json").write_text(json.dumps({
        "image_seq_length": GEMMA3_IMAGE_TOKENS, "processor_class": "Gemma3Processor"}, indent=2) + "\n")
    return path
