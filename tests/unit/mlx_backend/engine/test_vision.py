"""mlx_backend/engine/vision.py (and the registry's and model_check's part): which models take images, a vision model's
prompt with its images' tokens, and the engine's image refusals. The serving path end to end is
tests/integration/test_vision.py."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mlx_backend.contract import ChatMessage, Generate, ImageInput, SamplingParams
from mlx_backend.engine import model_check, vision
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import make_entry
from tests.support.tiny_models import make_tiny_model
from tests.support.tiny_vlm import make_tiny_qwen2_vl


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    return {"vlm": make_tiny_qwen2_vl(root / "vlm", max_pixels=1024 * 1024), "text": make_tiny_model(root / "text")}


@pytest.fixture(scope="module")
def vlm(folders: dict[str, Path]) -> Any:
    return SimpleNamespace(artifacts=vision.load(make_entry("vlm", folders["vlm"], "models_dir")))


def png(size: int, seed: int = 0) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def ask(*images: ImageInput, model: str = "vlm", n: int = 1) -> Generate:
    return Generate("r", model, SamplingParams(max_tokens=4), messages=(ChatMessage("user", "what", images=images),),
                    n=n)


def test_the_registry_tells_a_vision_model_from_a_text_model(folders: dict[str, Path]) -> None:
    assert make_entry("vlm", folders["vlm"], "models_dir").vision
    assert not make_entry("text", folders["text"], "models_dir").vision


def test_a_vision_model_is_validated_against_mlx_vlm(folders: dict[str, Path], tmp_path: Path) -> None:
    assert model_check.validate(make_entry("vlm", folders["vlm"], "models_dir")) > 0
    odd = make_tiny_qwen2_vl(tmp_path / "odd")
    config = (odd / "config.json").read_text().replace('"model_type": "qwen2_vl"', '"model_type": "no_such_vlm"')
    (odd / "config.json").write_text(config)
    with pytest.raises(EngineError) as caught:
        model_check.validate(make_entry("odd", odd, "models_dir"))
    assert caught.value.code is EngineErrorCode.MODEL_UNSUPPORTED and "mlx-vlm" in caught.value.message


def test_images_for_a_text_model_are_refused_naming_it(folders: dict[str, Path]) -> None:
    image = ImageInput(png(56), "image/png")
    vision.refuse_images(ask(image), make_entry("vlm", folders["vlm"], "models_dir"))
    vision.refuse_images(ask(), make_entry("text", folders["text"], "models_dir"))  # no images: nothing to refuse
    with pytest.raises(EngineError) as caught:
        vision.refuse_images(ask(image), make_entry("text", folders["text"], "models_dir"))
    assert caught.value.code is EngineErrorCode.IMAGES_NOT_SUPPORTED
    assert "'text' does not take images: it is a text-only model" in caught.value.message


@pytest.fixture
def without_mlx_vlm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(model_check, "vision_available", lambda: False)
    yield


def test_without_mlx_vlm_a_vision_checkpoint_is_text_and_its_images_name_the_extra(
    folders: dict[str, Path], without_mlx_vlm: None
) -> None:
    entry = make_entry("vlm", folders["vlm"], "models_dir")
    assert not vision.serves(entry)
    with pytest.raises(EngineError) as caught:
        vision.refuse_images(ask(ImageInput(png(56), "image/png")), entry)
    assert 'pip install "mlx-gateway[vision]"' in caught.value.message


def test_the_prompt_holds_each_image_as_its_tokens(vlm: Any) -> None:
    text, _ = vision.prompt_of(ask(), vlm)
    tokens, pixels = vision.prompt_of(ask(ImageInput(png(56), "image/png"), ImageInput(png(112), "image/png")), vlm)
    assert pixels.image_tokens == 4 + 16  # one token per 28x28 pixels
    assert len(tokens) == len(text) + 2 * 2 + 4 + 16  # each framed by <|vision_start|> and <|vision_end|>
    assert pixels.pixel_values is not None and "image_grid_thw" in pixels.extra


def test_low_detail_shrinks_the_image_to_512_pixels(vlm: Any) -> None:
    _, high = vision.prompt_of(ask(ImageInput(png(1008), "image/png", detail="high")), vlm)
    _, low = vision.prompt_of(ask(ImageInput(png(1008), "image/png", detail="low")), vlm)
    assert high.image_tokens == (1008 // 28) ** 2
    assert low.image_tokens == (504 // 28) ** 2  # 512 rounded to the processor's 28-pixel grid


def test_an_undecodable_or_huge_image_is_refused(vlm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EngineError) as caught:
        vision.prompt_of(ask(ImageInput(png(56)[:40], "image/png")), vlm)
    assert caught.value.code is EngineErrorCode.INVALID_IMAGE and caught.value.param == "messages[0]"
    monkeypatch.setattr(vision, "MAX_PIXELS", 100 * 100)
    with pytest.raises(EngineError) as caught:
        vision.prompt_of(ask(ImageInput(png(112), "image/png")), vlm)
    assert "112x112 pixels" in caught.value.message


def test_n_above_one_is_refused_for_a_vision_model(vlm: Any) -> None:
    with pytest.raises(EngineError) as caught:
        vision.prompt_of(ask(n=2), vlm)
    assert caught.value.param == "n"


def test_a_vision_model_loaded_as_text_refuses_images(folders: dict[str, Path]) -> None:
    """An engine group loads a model through mlx-lm (text only): images sent to it are refused, not dropped."""
    entry = make_entry("vlm", folders["vlm"], "models_dir")
    with pytest.raises(EngineError) as caught:
        vision.refuse_images(ask(ImageInput(png(56), "image/png")), entry, sees=False)
    assert caught.value.code is EngineErrorCode.IMAGES_NOT_SUPPORTED and "as text only" in caught.value.message


@pytest.mark.parametrize(("fmt", "media_type"), [("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")])
def test_jpeg_gif_and_webp_are_decoded_like_png(vlm: Any, fmt: str, media_type: str) -> None:
    out = io.BytesIO()
    Image.open(io.BytesIO(png(56))).save(out, fmt)
    _, pixels = vision.prompt_of(ask(ImageInput(out.getvalue(), media_type)), vlm)
    assert pixels.image_tokens == 4
