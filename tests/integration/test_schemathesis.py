"""schemathesis, every check, over every operation of openapi/openapi.json, against a real server with a key,
its fuzzed bodies naming a served model (tests/support/schemathesis_hooks.py) so generation is fuzzed too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import StartServer
from tests.support.schemathesis_hooks import EMBEDDING_MODEL, SERVED_MODEL
from tests.support.tiny_embedding_models import make_tiny_bert
from tests.support.tiny_models import make_tiny_model

OPENAPI = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
KEY = "sk-schemathesis"
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/embeddings")


def _answered_200(metrics: str) -> dict[str, float]:
    """Requests answered 200 per route, from the gateway's own counter."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name.endswith("http_requests_total") and sample.labels.get("status") == "200":
                route = sample.labels["route"]
                found[route] = found.get(route, 0) + sample.value
    return found


def test_schemathesis_finds_no_failure_and_no_500(start_server: StartServer, tmp_path: Path) -> None:
    # A context no fuzzed prompt fills; the hooks keep each generation short (16 tokens, as the default here).
    make_tiny_model(tmp_path / "models" / SERVED_MODEL, chat_format="qwen2.5", context_length=4096)
    make_tiny_bert(tmp_path / "models" / EMBEDDING_MODEL, context=512)
    server = start_server("--models-dir", str(tmp_path / "models"), "--api-key", KEY, "--max-tokens-default", "16")
    server.wait_ready()
    cli = shutil.which("schemathesis") or shutil.which("st")
    assert cli, "schemathesis is installed by `pip install -e .[test]`"
    result = subprocess.run(
        [cli, "run", str(OPENAPI), "--url", server.base_url, "--checks", "all",
         "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "60",
         "--max-response-time", "60",  # a prefill of thousands of fuzzed tokens on a loaded 2-core CPU
         "--phases", "examples,coverage,fuzzing", "--max-examples", "20", "--workers", "2",
         "--seed", "20261125", "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert " 500" not in output.split("SUMMARY")[-1]
    assert server.health().json()["engine"]["restarts"] == 0, "the fuzzing must not have cost an engine"
    answered = _answered_200(httpx.get(server.base_url + "/metrics", timeout=10).text)
    for route in GENERATION_ROUTES:  # fuzzed generation requests were served, not stopped at model lookup
        assert answered.get(route, 0) >= 5, (route, answered)
    sys.stdout.write(output[-600:])
