"""The engine as an operating-system process: spawn it with a fresh interpreter, hand it one end of a
socketpair, and kill it for sure. No MLX here: the gateway imports this.

A fresh interpreter (never fork) because Metal and CUDA contexts do not survive a fork, and because the
gateway must stay free of MLX.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

import msgspec

from mlx_backend.contract import EngineConfig
from mlx_backend.ipc import GatewaySide

log = logging.getLogger("mlx_gateway.engine")


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL the engine if the gateway dies first, so no orphan is left."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def child_setup(cpus: tuple[int, ...]) -> Callable[[], None]:
    """What the child runs before exec: die with the parent, and run on `cpus` from its first instruction
    (every thread it ever starts inherits the mask)."""

    def setup() -> None:
        die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class EngineProcess:
    """One spawned engine process and its socket; single use (make a new one to restart)."""

    def __init__(self, config: EngineConfig, extra_env: dict[str, str] | None = None,
                 worker_module: str = "mlx_backend.engine.worker") -> None:
        self.config = config
        self._extra_env = extra_env or {}
        self._worker_module = worker_module  # tests swap in a scripted worker
        self._proc: asyncio.subprocess.Process | None = None
        self.channel: GatewaySide | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def spawn(self) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", **self._extra_env}
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self._worker_module,
                "--fd", str(child_sock.fileno()),
                "--config", msgspec.json.encode(self.config).decode(),
                pass_fds=(child_sock.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
                preexec_fn=child_setup(self.config.cpu_affinity),
            )
        finally:
            child_sock.close()
        self.channel = await GatewaySide.open(parent_sock)
        log.info("engine process started", extra={"engine_pid": self._proc.pid})

    async def wait(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    def describe(self) -> str:
        return describe_exit(self.returncode)

    def problem(self, heartbeat_timeout_s: float, ready_timeout_s: float) -> str | None:
        """A group's ranks can fail in ways no exit shows (mlx_backend/client/group.py); one process cannot."""
        return None

    def kill(self) -> None:
        """SIGKILL: works on a stopped (SIGSTOP) or wedged process too."""
        if self._proc and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        if self.channel:
            self.channel.close()

    async def stop(self, timeout_s: float) -> int | None:
        """Wait for a requested exit, then kill; returns the exit code."""
        if self._proc is None:
            return None
        try:
            await asyncio.wait_for(self._proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("engine did not exit in %.1fs; killing it", timeout_s)
            self.kill()
            await self._proc.wait()
        if self.channel:
            self.channel.close()
        return self._proc.returncode
