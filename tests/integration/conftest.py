"""Integration tests: a real `mlx-gateway serve` process with a real engine on tiny models."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.server import ServerProcess
from tests.support.tiny_models import make_tiny_model

StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny random-weight models; 'tiny' is the one most tests talk to."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny", context_length=256)
    make_tiny_model(root / "org" / "tiny-two", seed=1)
    return root


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    servers: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(args, tmp_path / f"server-{len(servers)}.log", env).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def agent_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For the agent APIs (Responses, Messages): 'qwen' wears Qwen2.5's real chat template and tool-call
    format (so tool calls work, forced), 'json' has a JSON-shaped BPE for structured output, 'tiny' is plain."""
    root = tmp_path_factory.mktemp("agent-models")
    make_tiny_model(root / "tiny", context_length=512)
    make_tiny_model(root / "qwen", chat_format="qwen2.5", context_length=4096)
    make_tiny_model(root / "json", tokenizer="bpe", context_length=4096)
    return root


@pytest.fixture(scope="module")
def agent_server(agent_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with the agent models and the bundled demo model (mlx-gateway-demo)."""
    log = tmp_path_factory.mktemp("logs") / "agent-server.log"
    server = ServerProcess(["--models-dir", str(agent_models_dir), "--demo-model", "--test-faults"], log).start()
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the read-mostly tests of a module (starting one costs a few seconds)."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    server = ServerProcess(["--models-dir", str(models_dir), "--test-faults"], log).start()
    server.wait_ready()
    yield server
    server.stop()
