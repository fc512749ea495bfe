"""The batcher tests' models folder (tests/support/batcher_harness.py), built once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.batcher_harness import make_models_dir


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models_dir(tmp_path_factory.mktemp("models"))
