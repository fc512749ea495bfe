"""The code stays typed and tidy: mypy --strict and ruff over the packages, as CI runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy_strict_passes() -> None:
    result = run("mypy", "gateway", "mlx_backend")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_passes() -> None:
    result = run("ruff", "check", "gateway", "mlx_backend", "tests")
    assert result.returncode == 0, result.stdout + result.stderr
