"""The socket framing: every message kind survives the trip, and a corrupt stream is refused."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from mlx_backend.ipc import MAX_FRAME_BYTES, ConnectionClosed, EngineSide, GatewaySide, frame
from mlx_backend.types import (
    Abort,
    ChatMessage,
    Constraint,
    Delta,
    Failed,
    Finished,
    Generate,
    Heartbeat,
    LoadedModel,
    Ready,
    SamplingParams,
    Shutdown,
    Started,
)

pytestmark = pytest.mark.anyio


async def test_commands_and_events_round_trip() -> None:
    gateway_sock, engine_sock = socket.socketpair()
    gateway = await GatewaySide.open(gateway_sock)
    engine = EngineSide(engine_sock)
    commands = [
        Generate("r1", "m", SamplingParams(max_tokens=5, stop=("x", "y"), seed=3),
                 messages=(ChatMessage("user", "héllo"),)),
        Generate("r2", "m", SamplingParams(max_tokens=5), prompt="p",
                 constraint=Constraint("json_schema", '{"type": "object"}', strict=True)),
        Abort("r1"),
        Shutdown(),
    ]
    for command in commands:
        gateway.send(command)
    await asyncio.sleep(0)
    assert [await asyncio.to_thread(engine.receive) for _ in commands] == commands
    events = [
        Ready(1, "cpu", "0", "0"), Started("r1", 3, 1), Delta("r1", "tok", 1),
        Finished("r1", "stop", 3, 1, 1), Failed("r2", "model_not_found", "no", "model"),
        Heartbeat(1, 1, 0, None, (LoadedModel("m", 10, 0.0, 1),), (), 0, 0, 0),
    ]
    for event in events:
        engine.send(event)
    assert [await gateway.receive() for _ in events] == events
    gateway.close()


async def test_a_closed_engine_socket_is_connection_closed() -> None:
    gateway_sock, engine_sock = socket.socketpair()
    gateway = await GatewaySide.open(gateway_sock)
    engine_sock.sendall(frame(Started("r", 1, 0))[:5])  # a frame cut short, then the peer dies
    engine_sock.close()
    with pytest.raises(ConnectionClosed):
        await gateway.receive()


async def test_an_absurd_frame_length_is_refused() -> None:
    gateway_sock, engine_sock = socket.socketpair()
    gateway = await GatewaySide.open(gateway_sock)
    engine_sock.sendall(struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(ConnectionClosed):
        await gateway.receive()
