"""The socket framing: every message kind survives the trip, and a corrupt stream is refused."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from mlx_backend.contract import (
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
from mlx_backend.ipc import MAX_FRAME_BYTES, ConnectionClosed, EngineSide, GatewaySide, frame

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


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0.05)[0])


async def test_held_events_go_out_together_in_order_at_flush() -> None:
    gateway_sock, engine_sock = socket.socketpair()
    engine = EngineSide(engine_sock)
    step = [Delta("a", "x", 1), Delta("b", "y", 1), Finished("a", "length", 3, 1, 0)]
    for event in step:
        engine.hold(event)
    assert not _readable(gateway_sock)  # nothing is written before the step's end
    engine.flush()
    engine.flush()  # nothing held: nothing written
    gateway = await GatewaySide.open(gateway_sock)
    assert await gateway.receive_many() == step  # one read, every frame of the step
    gateway.close()


async def test_heartbeats_from_another_thread_never_split_the_mlx_threads_frames() -> None:
    import contextlib
    import threading

    gateway_sock, engine_sock = socket.socketpair()
    engine = EngineSide(engine_sock)
    beat = Heartbeat(1, 1, 0, None, (LoadedModel("m" * 200, 10, 0.0, 1),), (), 0, 0, 0)
    stop = threading.Event()

    def heartbeats() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                engine.send(beat)

    deltas = [Delta(f"r{i % 7}", "t" * (i % 4000), 1) for i in range(3000)]  # flushes beyond the socket buffer

    def mlx_thread() -> None:
        for i, delta in enumerate(deltas):
            engine.hold(delta)
            if i % 64 == 63:
                engine.flush()
        engine.flush()

    thread = threading.Thread(target=heartbeats)
    thread.start()
    gateway = await GatewaySide.open(gateway_sock)
    writer = asyncio.create_task(asyncio.to_thread(mlx_thread))
    received: list[Delta] = []
    try:
        while len(received) < len(deltas):
            for event in await asyncio.wait_for(gateway.receive_many(), 10):
                if isinstance(event, Delta):
                    received.append(event)
                else:
                    assert event == beat
        await writer
    finally:  # a torn frame must fail the test, not hang it: unblock both writers
        stop.set()
        gateway.close()
        engine_sock.close()
        thread.join(5)
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer, 5)
    assert received == deltas


async def test_frames_cut_anywhere_by_the_socket_are_put_back_together() -> None:
    gateway_sock, engine_sock = socket.socketpair()
    gateway = await GatewaySide.open(gateway_sock)
    events = [Started("r", 3, 1), Delta("r", "héllo", 2), Finished("r", "stop", 3, 2, 1)]
    data = b"".join(frame(e) for e in events)
    for i in range(len(data)):  # one byte at a time: every cut, inside headers and payloads
        engine_sock.sendall(data[i:i + 1])
        await asyncio.sleep(0)
    got: list[object] = [await gateway.receive()]  # one at a time still works, and mixes with receive_many
    while len(got) < len(events):
        got += await gateway.receive_many()
    assert got == events
    gateway.close()
