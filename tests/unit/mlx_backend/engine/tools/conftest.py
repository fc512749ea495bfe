"""Tiny models dressed as real families (their published chat templates and special tokens), loaded the
way the engine loads them: mlx-lm's tokenizer wrapper, which also picks mlx-lm's tool parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer

from tests.support import tiny_models

FORMATS = ("qwen2.5", "qwen3", "llama3.1", "mistral")


def load(path: Path) -> Any:
    config = json.loads((path / "config.json").read_text())
    return load_tokenizer(path, eos_token_ids=config["eos_token_id"])  # type: ignore[no-untyped-call]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tool_models")
    return {fmt: tiny_models.make_tiny_model(root / fmt, chat_format=fmt, context_length=4096) for fmt in FORMATS}


@pytest.fixture(scope="session")
def tokenizers(model_dirs: dict[str, Path]) -> dict[str, Any]:
    return {fmt: load(path) for fmt, path in model_dirs.items()}
