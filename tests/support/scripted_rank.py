"""A stand-in rank of an engine group that speaks the real group protocol without MLX, for supervision tests
(`python -m tests.support.scripted_rank --connect HOST:PORT --config JSON`, as mlx_backend/client/group.py starts a
rank): the token from stdin, Hello, heartbeats; rank 0 says Ready and answers each Generate with Started and
Finished. A Generate whose prompt is "wake" makes rank 0 send a Wake, on which the other ranks exit with code
42 (so a test sees the gateway relay it). SCRIPTED_RANK_FREEZE=<rank> makes that rank stop its heartbeats
after two seconds; SCRIPTED_RANK_TOKEN overrides the token it presents.
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import sys
import threading
import time

import msgspec

from mlx_backend import __version__
from mlx_backend.client.group import _version
from mlx_backend.contract import (
    EngineConfig,
    Finished,
    Generate,
    Heartbeat,
    Hello,
    RankHeartbeat,
    Ready,
    Shutdown,
    Started,
    Wake,
)
from mlx_backend.ipc import ConnectionClosed, EngineSide


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connect", required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    config = msgspec.json.decode(args.config, type=EngineConfig)
    rank = int(os.environ["MLX_RANK"])
    token = sys.stdin.readline().strip()
    token = os.environ.get("SCRIPTED_RANK_TOKEN", token)
    host, _, port = args.connect.rpartition(":")
    channel = EngineSide(socket.create_connection((host, int(port))))
    channel.send(Hello(rank, token, os.getpid(), socket.gethostname(), _version("mlx"), _version("mlx-lm"),
                       __version__))
    freeze_at = time.monotonic() + 2 if os.environ.get("SCRIPTED_RANK_FREEZE") == str(rank) else None

    def heartbeats() -> None:
        while freeze_at is None or time.monotonic() < freeze_at:
            if rank == 0:
                channel.send(Heartbeat(0, 0, 0, None, (), (), 0, 0, 0))
            else:
                channel.send(RankHeartbeat(rank, 0, None, 0))
            time.sleep(config.heartbeat_interval_s)

    inbox: queue.Queue[object] = queue.Queue()

    def reader() -> None:
        try:
            while True:
                inbox.put(channel.receive())
        except (ConnectionClosed, OSError):
            os._exit(0)

    threading.Thread(target=heartbeats, daemon=True).start()
    threading.Thread(target=reader, daemon=True).start()
    if rank == 0:
        channel.send(Ready(pid=os.getpid(), device="scripted", mlx_version="-", mlx_lm_version="-"))
    while True:
        command = inbox.get()
        if isinstance(command, Shutdown):
            os._exit(0)
        if isinstance(command, Wake) and rank != 0:
            os._exit(42)
        if isinstance(command, Generate):
            if command.prompt == "wake":
                channel.send(Wake())
                continue
            channel.send(Started(command.request_id, 1, 0))
            channel.send(Finished(command.request_id, "stop", 1, 0, 0))


if __name__ == "__main__":
    main()
