"""A loopback HTTP proxy that records what a client sent and the status it got, then relays the answer
as it streams. Tests that drive real clients (coding agents) put it in front of the gateway, so a failure
shows the requests the client made, bodies included."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "accept-encoding"}


@dataclass
class Exchange:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the JSON body, or its text
    status: int = 0
    answer: str = ""  # the start of the answer's body

    def summary(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


class RecordingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.exchanges: list[Exchange] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the answer ends when the connection closes: relayed as it streams

            def log_message(self, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                exchange = Exchange(self.command, self.path, dict(self.headers.items()), body)
                proxy.exchanges.append(exchange)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                with httpx.Client(timeout=None) as client, client.stream(
                    self.command, proxy.upstream + self.path, headers=headers, content=raw
                ) as answer:
                    exchange.status = answer.status_code
                    self.send_response(answer.status_code)
                    for key, value in answer.headers.items():
                        if key.lower() not in _HOP_BY_HOP:
                            self.send_header(key, value)
                    self.end_headers()
                    for chunk in answer.iter_raw():
                        if len(exchange.answer) < 2000:
                            exchange.answer += chunk.decode(errors="replace")[:2000]
                        self.wfile.write(chunk)
                        self.wfile.flush()

            do_GET = do_POST = do_HEAD = do_DELETE = do_OPTIONS = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def report(self, exchanges: list[Exchange] | None = None) -> str:
        """Each exchange (all by default): the line, the status, the request body's top-level fields, a
        failure's answer."""
        lines = []
        for e in self.exchanges if exchanges is None else exchanges:
            lines.append(e.summary())
            if isinstance(e.body, dict):
                lines.append("  fields: " + ", ".join(sorted(e.body)))
            if e.status >= 400:
                lines.append("  answer: " + e.answer[:800])
        return "\n".join(lines)
