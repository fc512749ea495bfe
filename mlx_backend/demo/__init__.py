"""The demo model this project ships, so `serve` has something to offer with no models configured.

Importing this package must stay cheap and MLX-free: the gateway's registry imports it.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_ID = "mlx-gateway-demo"


def demo_model_path() -> Path:
    """The folder holding the demo model (made by `python -m mlx_backend.engine.demo_train`)."""
    return Path(__file__).resolve().parent / "model"
