"""Probes against real sockets: answers, errors, silence, nothing listening, and a proxy set."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gateway.watchdog import probe


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = {"/health/live": (200, {"status": "alive"}),
                "/health": (503, {"status": "engine_down", "ready": False})}.get(self.path, (404, {}))
        data = json.dumps(body[1]).encode()
        self.send_response(body[0])
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_url() -> Iterator[str]:
    """Accepts connections (the kernel does) but never answers: a stopped or hung process."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_live_and_health(url: str) -> None:
    assert probe.live(url, 2)
    assert probe.health(url + "/", 2) == (503, {"status": "engine_down", "ready": False})


def test_silence_times_out(silent_url: str) -> None:
    began = time.monotonic()
    assert not probe.live(silent_url, 0.3)
    assert time.monotonic() - began < 2
    assert probe.health(silent_url, 0.3) == (None, None)


def test_nothing_listening(silent_url: str) -> None:
    port = int(silent_url.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert port != free
    assert not probe.live(f"http://127.0.0.1:{free}", 1)


def test_a_proxy_in_the_environment_is_not_used(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert probe.live(url, 2)
