"""A real `mlx-gateway serve` process on loopback, for integration tests: start, wait, signal, clean up."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A free port whose next one is free too (a ring group of two ranks listens on both), taken below the
    system's ephemeral range: a port the OS hands out later (the server's own, from `free_port`, or any socket
    bound to port 0) can then never be one of the two."""
    lowest_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError):
        lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(50):
        port = random.randrange(10_000, lowest_ephemeral - 1)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports")


class ServerProcess:
    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._args = ["--port", str(self.port), "--no-hf-cache", *args]
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", *self._args],
            stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True,
        )
        return self

    def wait_ready(self, timeout_s: float = 60, path: str = "/health") -> dict[str, Any]:
        """Poll until `path` answers 200; fail with the server's log if it never does."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(self.base_url + path, timeout=2)
                if response.status_code == 200:
                    return response.json()  # type: ignore[no-any-return]
                last = response.text
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout_s}s (last: {last}):\n{self.log()}")

    def health(self) -> httpx.Response:
        return httpx.get(self.base_url + "/health", timeout=5)

    def engine_pid(self) -> int:
        pid = self.health().json()["engine"]["pid"]
        assert isinstance(pid, int)
        return pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.proc.pid).children(recursive=True)
        return []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Leave nothing behind: SIGTERM the group, then SIGKILL whatever is left."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
