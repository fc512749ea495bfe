"""A real server on Linux with MLX on the CPU: by default its engine process multiplies matrices with the
system's OpenBLAS (mapped into the engine, named in its start log) and answers; `--cpu-blas off` keeps MLX's
reference BLAS. The gateway process itself never loads it. CI installs OpenBLAS (tests/run.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import psutil
import pytest

from mlx_backend import cpu_blas
from mlx_backend.demo import DEMO_MODEL_ID
from tests.support.server import ServerProcess

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the preload is for MLX's Linux CPU wheel")


def _mapped(pid: int) -> set[str]:
    return {m.path for m in psutil.Process(pid).memory_maps()}


def _serve_and_ask(tmp_path: Path, *args: str) -> tuple[ServerProcess, set[str], set[str]]:
    server = ServerProcess(["--demo-model", *args], tmp_path / "server.log").start()
    try:
        server.wait_ready(timeout_s=90)
        reply = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
            "model": DEMO_MODEL_ID, "messages": [{"role": "user", "content": "Tell me about the gateway."}],
            "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0
        assert server.proc is not None
        return server, _mapped(server.engine_pid()), _mapped(server.proc.pid)
    finally:
        server.stop()


def test_by_default_the_engine_multiplies_with_the_systems_openblas(tmp_path: Path) -> None:
    library = cpu_blas.system_openblas()
    assert library is not None, "no OpenBLAS on this machine: tests/run.sh installs libopenblas0-pthread"
    real = str(Path(library).resolve())
    server, engine, gateway = _serve_and_ask(tmp_path)
    assert real in engine
    assert real not in gateway
    assert f"matrix products on the CPU: {library}" in server.log()


def test_with_cpu_blas_off_the_engine_keeps_mlxs_own(tmp_path: Path) -> None:
    library = cpu_blas.system_openblas()
    assert library is not None
    server, engine, _ = _serve_and_ask(tmp_path, "--cpu-blas", "off")
    assert str(Path(library).resolve()) not in engine
    assert "matrix products on the CPU: MLX's reference BLAS" in server.log()
