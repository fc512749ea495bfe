"""The demo model the project ships: present, small, loads offline with mlx-lm, and answers a chat."""

from __future__ import annotations

import json
from pathlib import Path

import mlx_lm
import pytest

from mlx_backend import registry
from mlx_backend.demo import DEMO_MODEL_ID, demo_model_path

MAX_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def folder() -> Path:
    path = demo_model_path()
    assert (path / "config.json").is_file(), "run `python -m mlx_backend.engine.demo_train` to make the demo model"
    return path


def test_id_matches_the_registry() -> None:
    assert registry.DEMO_MODEL_ID == DEMO_MODEL_ID


def test_folder_is_small_and_complete(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) < MAX_BYTES
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    assert "PSF" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_loads_offline_and_answers_a_chat(folder: Path) -> None:
    model, tokenizer = mlx_lm.load(str(folder))[:2]
    messages = [{"role": "user", "content": "What is a list?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # type: ignore[no-untyped-call]
    text = "".join(r.text for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=24))
    assert text.strip()
    assert "<|assistant|>" not in text
