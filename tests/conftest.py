"""Shared test configuration: async tests run on asyncio through anyio's pytest plugin."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub: make any accidental attempt fail loudly instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
