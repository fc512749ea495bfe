"""The engine process's line to the gateway, the same whether it runs alone (worker.py) or as one rank of a
group (rank.py): the socket (`Channel`), the heartbeat thread, the exit that never waits; and the process's
log format and name."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import sys
import time
from collections.abc import Callable
from importlib import metadata

from mlx_backend import timeline
from mlx_backend.contract import Command, Event, Loading, Started
from mlx_backend.ipc import ConnectionClosed, EngineSide

log = logging.getLogger("mlx_gateway.engine")

PROCESS_NAME = "mlx-gateway-engine"


def setup_logging(prefix: str = "engine") -> None:
    # stderr is the gateway's: the prefix tells engine lines apart in one log stream.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"{prefix}: %(asctime)s %(levelname)s {PROCESS_NAME}[%(process)d] %(name)s: %(message)s"
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("MLX_GATEWAY_ENGINE_LOG_LEVEL", "INFO").upper())


def set_process_name() -> None:
    """Linux: name the process in ps/top (comm), so it is told apart from the gateway."""
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(15, PROCESS_NAME.encode()[:15], 0, 0, 0)  # PR_SET_NAME


class Channel:
    """The socket, with one rule: if the gateway is gone, so are we.

    The MLX thread's events (`emit`) go out together at the end of each loop pass (`flush`): one frame
    write per step, not one per row. Loading and Started go at once: a model load or a prefill may follow.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._side = EngineSide(sock)

    def send(self, event: Event) -> None:
        """Now, from any thread (the heartbeat thread's way)."""
        try:
            self._side.send(event)
        except OSError as exc:
            self._gone(exc)

    def emit(self, event: Event) -> None:
        """The MLX thread's events, in order, sent by the next `flush`."""
        self._side.hold(event)
        if isinstance(event, Loading | Started):
            self.flush()

    def flush(self) -> None:
        try:
            self._side.flush()
        except OSError as exc:
            self._gone(exc)

    def _gone(self, exc: OSError) -> None:
        log.error("cannot write to the gateway (%s); exiting", exc)
        exit_process(1)

    def read_forever(self, inbox: queue.Queue[Command]) -> None:
        try:
            while True:
                inbox.put(self._side.receive())
        except (ConnectionClosed, OSError):
            log.info("the gateway closed the connection; exiting")
            exit_process(0)
        except Exception:  # a frame we cannot decode: the stream is broken
            log.exception("unreadable command from the gateway; exiting")
            exit_process(1)


def exit_process(code: int) -> None:
    timeline.stop()
    logging.shutdown()
    os._exit(code)


def send_heartbeats(channel: Channel, interval_s: float, source: list[Callable[[], Event]]) -> None:
    """Send source[0]() every interval; the MLX thread swaps in the batcher's once it exists."""
    while True:
        try:
            heartbeat = source[0]()
        except Exception:  # a race with the MLX thread must not silence the heartbeat for good
            log.debug("heartbeat snapshot failed; trying again", exc_info=True)
        else:
            channel.send(heartbeat)
        time.sleep(interval_s)


def package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
