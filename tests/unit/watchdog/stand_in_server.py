"""A stand-in for `mlx-gateway serve` that the watchdog tests can crash, hang and kill cheaply.

Speaks the same contract: `--port`, the pid file from MLX_GATEWAY_PID_FILE, GET /health/live and
GET /health, exit 0 on SIGTERM. Test knobs (environment):
- STAND_IN_STARTS_FILE: append this pid on every start (the tests count starts with it)
- STAND_IN_CRASH_FILE: when this file exists, exit 1 right after starting (a crash at every start)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STARTED = time.monotonic()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health/live":
            self._send(200, {"status": "alive"})
        elif self.path == "/health":
            self._send(200, {"status": "ok", "ready": True, "reason": None, "models_loaded": 0,
                             "models_available": 0, "engine": {}, "version": "stand-in",
                             "uptime_s": round(time.monotonic() - STARTED, 3)})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def _send(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if starts := os.environ.get("STAND_IN_STARTS_FILE"):
        with open(starts, "a") as f:
            f.write(f"{os.getpid()}\n")
    pid_file = os.environ.get("MLX_GATEWAY_PID_FILE")
    if pid_file:
        Path(pid_file).write_text(f"{os.getpid()}\n")
    crash = os.environ.get("STAND_IN_CRASH_FILE")
    if crash and Path(crash).exists():
        print("stand-in: crashing at start as told", file=sys.stderr, flush=True)
        return 1
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"stand-in: serving on {args.port} (pid {os.getpid()})", file=sys.stderr, flush=True)
    server.serve_forever(poll_interval=0.05)
    if pid_file:
        Path(pid_file).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
