"""Vision-language models through mlx-vlm (the optional extra `pip install "mlx-gateway[vision]"`).

A model whose config has a vision tower (`registry.is_vision_config`) is served through mlx-vlm when it is
installed; without it such a checkpoint is served as before, as text through mlx-lm, and an image sent to it
is a 400 naming the extra. mlx-vlm is imported here only, lazily, on the MLX thread, and only when a vision
model loads.

Why a separate path: mlx-lm's BatchGenerator (and our solo path, mlx_backend/engine/solo.py) feed token ids; a
vision model's first forward pass needs the image's pixels merged into the prompt's embeddings, and its
decoder keeps per-request position state (Qwen2-VL's mRoPE). So every request to a vision model, with
images or not, runs as its model's one "solo" row through mlx-vlm's `generate_step`, one token per engine
step, while other models' batches step beside it; requests for the same vision model wait their turn, one
at a time (serialised per model). Everything around the decoding is the text path's: admission, the
request's plan (sampler, penalties, grammar, stop strings, tools, reasoning: mlx_backend/engine/plan.py, with the
prompt's tokens made here), the memory budget (the KV cache of prompt tokens, image tokens included, plus
max_tokens), timeouts, cancellation, drain, metrics and keep-alive/eviction. Not shared: the prefix cache (an
image's tokens are the same placeholder id whatever the pixels, so a cached prefix could hold another
image) and the prefill in paced pieces (a vision prompt is prefilled in one pass, so a very long prompt
holds the MLX thread for the whole of it).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import LogitsProcessor, Sampler

from mlx_backend.contract import Generate, ImageInput
from mlx_backend.engine import model_check
from mlx_backend.engine.model_check import LoadedArtifacts
from mlx_backend.engine.tools import prompt_tokens
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelEntry, context_length_of

log = logging.getLogger("mlx_gateway.engine.vision")

EXTRA = 'pip install "mlx-gateway[vision]"'
MAX_PIXELS = 50_000_000  # a decoded image larger than this (a decompression bomb?) is refused before decoding
LOW_DETAIL_SIDE = 512  # detail "low": the image shrunk to fit this square (OpenAI's low detail is 512x512)


def serves(entry: ModelEntry) -> bool:
    """Whether this model is served through mlx-vlm (its images are seen)."""
    return entry.vision and model_check.vision_available()


def takes_images(cached: Any) -> bool:
    """Whether a loaded model is a vision model (a `CachedModel`)."""
    return cached.artifacts.processor is not None


def has_images(command: Generate) -> bool:
    return any(m.images for m in command.messages or ())


def refuse_images(command: Generate, entry: ModelEntry, sees: bool | None = None) -> None:
    """A model that will not see images sent some: a 400 naming the model. Before the load `sees` is what the
    entry says (`serves`); once loaded, whether it was loaded with its vision tower (`takes_images`)."""
    if not has_images(command) or (serves(entry) if sees is None else sees):
        return
    if not entry.vision:
        why = "it is a text-only model"
    elif not model_check.vision_available():
        why = f"it is a vision-language model, but this server lacks mlx-vlm ({EXTRA})"
    else:
        why = "this engine serves it as text only (an engine group loads no vision tower)"
    raise EngineError(EngineErrorCode.IMAGES_NOT_SUPPORTED,
                      f"The model '{entry.id}' does not take images: {why}. Send text only, or pick a vision model.",
                      "messages")


def load(entry: ModelEntry) -> LoadedArtifacts:
    """Validate, then load the model, its tokenizer and its image processor at once, on the MLX thread."""
    size = model_check.validate(entry)
    try:
        from mlx_vlm.utils import load as load_vlm

        load_typed: Callable[..., tuple[Any, Any]] = load_vlm
        model, processor = load_typed(str(entry.path), trust_remote_code=False)
        config = model_check.load_config(entry.path)
        load_tokenizer: Callable[..., Any] = model_check.load_tokenizer
        tokenizer = load_tokenizer(entry.path, eos_token_ids=config.get("eos_token_id"))
    except EngineError:
        raise
    except Exception as exc:  # missing tensors, shapes, a processor config the processor rejects...
        log.warning("loading vision model %s from %s failed", entry.id, entry.path, exc_info=True)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EngineError(EngineErrorCode.MODEL_LOAD_FAILED, f"The model '{entry.id}' could not be loaded: "
                          f"{type(exc).__name__}: {text[:400]}.") from exc
    context = entry.context_length or context_length_of(config)
    log.info("loaded vision model %s (%.1f MB, context %s)", entry.id, size / 1e6, context)
    return LoadedArtifacts(model, tokenizer, config, size, context, processor=processor)


# -- a request's prompt ----------------------------------------------------------------------------------


@dataclass
class Pixels:
    """What the model's first forward pass takes besides the token ids."""

    pixel_values: mx.array | None
    mask: mx.array | None
    extra: dict[str, mx.array]  # model-specific inputs, e.g. Qwen2-VL's image_grid_thw
    image_tokens: int  # prompt tokens the images became


def prompt_of(command: Generate, cached: Any) -> tuple[list[int], Pixels]:
    """The prompt's token ids with the images' tokens in (what the context and the KV budget count), and the
    pixels. The chat template renders one placeholder per image (mlx_backend/engine/tools/render.py); the model's
    processor expands each into the image's tokens and makes the pixel values."""
    if command.n > 1:
        raise EngineError(EngineErrorCode.INVALID_REQUEST, "n > 1 is not available for vision models on this "
                          "server (their requests run one at a time); send n = 1.", "n")
    tokenizer: Any = cached.artifacts.tokenizer
    text_tokens = prompt_tokens(command, tokenizer)
    images = [(f"messages[{i}]", image) for i, m in enumerate(command.messages or ()) for image in m.images]
    if not images:
        return text_tokens, Pixels(None, None, {}, 0)
    decoded = [_decode(image, param) for param, image in images]
    text = tokenizer._tokenizer.decode(text_tokens, skip_special_tokens=False)
    try:
        # The text is the template's whole prompt (BOS included where the template puts one): nothing is added.
        inputs = cached.artifacts.processor(text=[text], images=decoded, return_tensors="np", padding=False,
                                            add_special_tokens=False)
    except Exception as exc:  # the processor's own checks (e.g. an image too small for its patches)
        raise EngineError(EngineErrorCode.INVALID_IMAGE, f"The model's image processor refused the images: "
                          f"{type(exc).__name__}: {str(exc)[:300]}", "messages") from exc
    tokens = [int(t) for t in np.asarray(inputs["input_ids"])[0]]
    pixel_values = inputs.get("pixel_values")
    mask = inputs.get("attention_mask")
    extra = {k: mx.array(np.asarray(v)) for k, v in inputs.items()
             if k not in ("input_ids", "attention_mask", "pixel_values") and v is not None}
    return tokens, Pixels(mx.array(np.asarray(pixel_values)) if pixel_values is not None else None,
                          mx.array(np.asarray(mask)) if mask is not None else None, extra,
                          len(tokens) - len(text_tokens) + len(images))


def _decode(image: ImageInput, param: str) -> Any:
    """The image as an RGB picture; anything undecodable or too large is a 400 naming the message."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise EngineError(EngineErrorCode.INVALID_IMAGE, f"An image is {width}x{height} pixels; the most "
                                  f"taken is {MAX_PIXELS} pixels.", param)
            picture = opened.convert("RGB")  # decodes it (a GIF: its first frame)
    except EngineError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EngineError(EngineErrorCode.INVALID_IMAGE, f"An image could not be decoded ({image.media_type}): "
                          f"{str(exc)[:200] or type(exc).__name__}.", param) from exc
    if image.detail == "low":
        picture.thumbnail((LOW_DETAIL_SIDE, LOW_DETAIL_SIDE))
    return picture


# -- decoding ---------------------------------------------------------------------------------------------


class VisionGeneration:
    """One request on a vision model, one token per `next_token` call (the first also runs the prefill, images
    and all), through mlx-vlm's `generate_step`. Shaped like mlx_backend/engine/solo.py's SoloGeneration where the
    batcher reads it; it never joins a batch and leaves nothing to the prefix cache."""

    def __init__(self, model: Any, prompt: list[int], pixels: Pixels, max_tokens: int, sampler: Sampler,
                 logits_processors: list[LogitsProcessor]) -> None:
        from mlx_vlm.generate.ar import generate_step  # the engine process, on the MLX thread, for a vision model

        # No chunked prefill: the logits processors then see the whole prompt first, as the text path shows
        # it to them (penalties count only generated tokens; a grammar starts after the prompt).
        step: Callable[..., Iterator[tuple[Any, mx.array]]] = generate_step  # it yields (int, logprobs)
        self._steps = step(
            mx.array([prompt]), model, pixels.pixel_values, pixels.mask, max_tokens=max_tokens, sampler=sampler,
            logits_processors=logits_processors or None, prefill_step_size=None, **pixels.extra,
        )
        self.prompt_cache: list[Any] = []  # mlx-vlm's, inside generate_step; never saved (see the module's docstring)
        self.tokens_in_cache: list[int] = []
        self.logprobs: mx.array | None = None
        self.prefilled = 0  # nothing for the prefix cache to keep (batcher._keep_long_prompt)

    def next_token(self, more: bool) -> int:
        """The next token; without `more` the generation is closed after it."""
        try:
            token, self.logprobs = next(self._steps)
        except StopIteration:  # cannot happen before max_tokens: the batcher ends the row at its budget
            raise RuntimeError("the vision generation ended before its token budget") from None
        if not more:
            self.close()
        return int(token)

    def close(self) -> None:
        close = getattr(self._steps, "close", None)
        if close is not None:
            close()


def new_generation(cached: Any, tokens: list[int], pixels: Pixels, max_tokens: int, choice: Any) -> VisionGeneration:
    return VisionGeneration(cached.artifacts.model, tokens, pixels, max_tokens, choice.sampler, choice.processors)
