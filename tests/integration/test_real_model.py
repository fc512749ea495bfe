"""The bundled real model end to end (issue 25): what a new user gets from `pip install . && mlx-gateway serve`
and the README's example, through a real server process and the real `openai` SDK. The first `serve` converts
the bundled GGUF once into the cache, lists `smollm2-135m-instruct` (8k context, with its provenance beside
it), and answers the README's question sensibly."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from mlx_backend import smollm2
from tests.support.real_model import smollm2_gguf
from tests.support.server import ServerProcess

pytestmark = pytest.mark.slow

README_QUESTION = "What is the capital of France?"


def test_the_first_serve_converts_the_bundled_model_and_answers_the_readme_question(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {"MLX_GATEWAY_CACHE_DIR": str(cache), "MLX_GATEWAY_SMOLLM2_GGUF": str(smollm2_gguf())}
    server = ServerProcess([], tmp_path / "server.log", env).start()  # no models dir: the bundled models
    try:
        server.wait_ready(timeout_s=600)  # the conversion runs once, before the server listens
        folder = smollm2.model_folder(root=cache)
        assert (folder / "PROVENANCE.md").is_file() and (folder / "LICENSE").is_file()
        assert "converting the bundled smollm2-135m-instruct once" in server.log()

        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=300, max_retries=0)
        listed = {m.id: m for m in client.models.list()}
        assert {"smollm2-135m-instruct", "mlx-gateway-demo"} <= set(listed)
        model = listed["smollm2-135m-instruct"]
        assert model.owned_by == "mlx-gateway"
        assert (model.model_extra or {}).get("context_length") == 8192
        assert (model.model_extra or {}).get("source") == "bundled"

        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": README_QUESTION}],
            max_tokens=32, temperature=0)
        answer = reply.choices[0].message.content or ""
        assert "Paris" in answer, answer
        assert reply.choices[0].finish_reason == "stop"  # it ends its answer itself, at <|im_end|>
    finally:
        server.stop()


def test_a_second_serve_reuses_the_converted_model(smollm2_models_dir: Path, tmp_path: Path) -> None:
    """The cache the fixture filled is the one `serve` uses: no second conversion, the model is listed."""
    cache = smollm2_models_dir.parent.parent
    server = ServerProcess([], tmp_path / "server.log", {"MLX_GATEWAY_CACHE_DIR": str(cache)}).start()
    try:
        server.wait_ready(timeout_s=60)
        ids = [m["id"] for m in httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"]]
        assert "smollm2-135m-instruct" in ids
        assert "converting" not in server.log()
    finally:
        server.stop()
