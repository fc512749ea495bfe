"""A real Prometheus scrapes a real server; the values read back through its API match what was sent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import openai

from tests.integration.conftest import StartServer
from tests.support.prometheus import PrometheusServer, require

REQUESTS = 5


def test_prometheus_reads_request_and_token_counters_that_match_reality(
    start_server: StartServer, models_dir: Path, tmp_path: Path
) -> None:
    server = start_server("--models-dir", str(models_dir))
    server.wait_ready()
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    prompt_tokens = completion_tokens = 0
    for i in range(REQUESTS):
        usage = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"count {i}"}], max_tokens=7,
        ).usage
        assert usage is not None
        prompt_tokens += usage.prompt_tokens
        completion_tokens += usage.completion_tokens

    with PrometheusServer(tmp_path, f"127.0.0.1:{server.port}") as prometheus:
        requests = prometheus.wait_for_value(
            'sum(mlx_gateway_http_requests_total{route="/v1/chat/completions",status="200"})', REQUESTS)
        generated = prometheus.wait_for_value('sum(mlx_gateway_generation_tokens_total{model="tiny"})',
                                              completion_tokens)
        prompts = prometheus.wait_for_value('sum(mlx_gateway_prompt_tokens_total{model="tiny"})', prompt_tokens)
        latencies = prometheus.value('sum(mlx_gateway_e2e_request_latency_seconds_count{model="tiny"})')
        up = prometheus.value('up{job="mlx-gateway"}')
        models_available = prometheus.value("mlx_gateway_models_available")
        models_loaded = prometheus.value("mlx_gateway_models_loaded")
    assert (requests, generated, prompts, latencies, up) == (REQUESTS, completion_tokens, prompt_tokens, REQUESTS, 1)
    assert (models_available, models_loaded) == (2, 1)


def test_promtool_finds_the_exposition_clean(start_server: StartServer, models_dir: Path) -> None:
    server = start_server("--models-dir", str(models_dir))
    server.wait_ready()
    httpx.post(server.base_url + "/v1/chat/completions", timeout=30,
               json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    exposition = httpx.get(server.base_url + "/metrics", timeout=5).text
    result = subprocess.run([require("promtool"), "check", "metrics"], input=exposition.encode(),
                            capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout.decode() + result.stderr.decode())
