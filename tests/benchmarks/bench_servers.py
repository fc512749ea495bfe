"""The servers under test: their command lines (all in `server_spec`), start, readiness, and cleanup.

Every process started here is in its own process group and in `_STARTED`; `stop_all` (called from
bench_serving's `finally` and on SIGTERM) kills each group, so nothing outlives a run or a Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("mlx_lm", "mlx_lm_backlog", "gateway")

# mlx_lm.server with socketserver's listen backlog raised from 5 to 1024: the stock backlog of 5 is
# what resets connections when tens of clients connect at once (measured: 0 resets with 1024).
_MLX_LM_BACKLOG = (
    "import runpy, socketserver, sys; socketserver.TCPServer.request_queue_size = 1024; "
    "sys.argv[0] = 'mlx_lm.server'; runpy.run_module('mlx_lm.server', run_name='__main__')"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerSpec:
    name: str
    argv: list[str]
    model_id: str  # the `model` field requests name
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)


def server_spec(
    name: str,
    model: Path,
    port: int,
    *,
    max_running: int = 64,
    max_queue: int = 256,
    extra_args: list[str] | None = None,
) -> ServerSpec:
    """The one place that knows each server's command line."""
    extra = list(extra_args or [])
    if name == "mlx_lm":
        # Defaults otherwise (decode concurrency 32, prompt concurrency 8): what users of it get.
        return ServerSpec(
            name,
            [
                sys.executable,
                "-m",
                "mlx_lm.server",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *extra,
            ],
            model_id=str(model),
        )
    if name == "mlx_lm_backlog":
        argv = [
            sys.executable,
            "-c",
            _MLX_LM_BACKLOG,
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ]
        return ServerSpec(name, argv, model_id=str(model))
    if name == "gateway":
        # The model id is the folder name under --models-dir. One token a pass (--draft-tokens 0), as the servers
        # and the ceilings beside it decode: a random-weight model's greedy output loops, and drafts from its own
        # output would be kept as no real model's are (bench_speculative.py measures drafting, on a real model;
        # a later --draft-tokens in `extra` wins).
        return ServerSpec(
            name,
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--models-dir",
                str(model.parent),
                "--no-hf-cache",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-running",
                str(max_running),
                "--max-queue",
                str(max_queue),
                "--draft-tokens",
                "0",
                *extra,
            ],
            model_id=model.name,
        )
    raise ValueError(f"unknown server {name!r}; known: {', '.join(SERVERS)}")


_STARTED: list[subprocess.Popen[bytes]] = []


def spawn(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` in a new process group (so its children die with it), output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            start_new_session=True,
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                **(env or {}),
            },
        )
    _STARTED.append(proc)
    pids_file = os.environ.get("BENCH_PIDS_FILE")  # a caller that must be able to clean up after a SIGKILL
    if pids_file:
        with open(pids_file, "a") as out:
            out.write(f"{proc.pid}\n")
    return proc


def stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> int | None:
    """SIGTERM the process group, then SIGKILL it after `grace_s`; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    # The leader may be gone while its children live on: always sweep the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc in _STARTED:
        _STARTED.remove(proc)
    return proc.returncode


def stop_all() -> None:
    for proc in list(_STARTED):
        stop(proc, grace_s=5.0)


class Server:
    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        self.spec = spec
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.proc = spawn(self.spec.argv, self.log_path, self.spec.env)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float) -> float:
        """Poll the health path until 200; returns seconds taken. Raises RuntimeError with the log tail."""
        started = time.monotonic()
        last = "no answer"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() - started < timeout_s:
                if not self.alive():
                    raise RuntimeError(
                        f"{self.spec.name} exited with {self.proc and self.proc.returncode}:\n"
                        f"{self.log_tail()}"
                    )
                try:
                    response = client.get(self.base_url + self.spec.health_path)
                    if response.status_code == 200:
                        return time.monotonic() - started
                    last = f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.25)
        raise RuntimeError(
            f"{self.spec.name} not ready in {timeout_s:.0f}s (last: {last}):\n{self.log_tail()}"
        )

    def stop(self) -> int | None:
        return stop(self.proc) if self.proc is not None else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
