"""Framing for the gateway <-> engine socket: a 4-byte big-endian length, then one msgpack message.

The engine side is blocking (threads), the gateway side is asyncio; both share the codecs here. The MLX
thread holds the frames of one step and writes them with one `sendall` at the step's end (`hold`, `flush`):
at 64 rows that is one syscall and one wake-up of the gateway per step instead of 64.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections import deque
from typing import cast

import msgspec

from mlx_backend import timeline
from mlx_backend.contract import Command, Delta, Event, Failed, Finished

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a frame larger than this means a corrupt stream

_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(Command)
_event_decoder = msgspec.msgpack.Decoder(Event)


class ConnectionClosed(Exception):
    """The other side closed the socket (or died)."""


def frame(message: Command | Event) -> bytes:
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


class EngineSide:
    """Blocking endpoint used inside the engine process. `send` is safe from any thread; `hold` and `flush`
    belong to one thread (the MLX thread), whose held frames go out together."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._held: list[bytes] = []
        self._traced: list[tuple[str, int, int, int, int, int]] = []  # timeline: the held Deltas' stamps

    def send(self, event: Event) -> None:
        """Write one event now (the heartbeat thread's way, and for anything that must not wait)."""
        data = frame(event)
        with self._send_lock:
            self._sock.sendall(data)

    def hold(self, event: Event) -> None:
        """Keep an event for the next `flush`, in order."""
        self._held.append(frame(event))
        if timeline.ACTIVE:
            self._stamp(event)

    def flush(self) -> None:
        """Write every held event in one `sendall` (under the lock the heartbeat thread shares)."""
        if not self._held:
            return
        data = b"".join(self._held) if len(self._held) > 1 else self._held[0]
        self._held.clear()
        begin = timeline.now() if self._traced else 0
        with self._send_lock:
            self._sock.sendall(data)
        if self._traced:
            end = timeline.now()
            for rid, cum, n, launched, sampled, emitted in self._traced:
                timeline.record("E", rid, cum, n, launched, sampled, emitted, begin, end)
            self._traced.clear()

    def _stamp(self, event: Event) -> None:
        if isinstance(event, Delta):
            cum = timeline.count(event.request_id, event.tokens)
            self._traced.append((event.request_id, cum, event.tokens, timeline.step_launched_ns, timeline.sampled_ns,
                                 timeline.now()))
        elif isinstance(event, Finished | Failed):
            timeline.forget(event.request_id)

    def receive(self) -> Command:
        (size,) = _HEADER.unpack(self._read_exactly(_HEADER.size))
        if size > MAX_FRAME_BYTES:
            raise ConnectionClosed(f"frame of {size} bytes")
        return cast(Command, _command_decoder.decode(self._read_exactly(size)))

    def _read_exactly(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self._sock.recv(size - len(chunks))
            if not chunk:
                raise ConnectionClosed("gateway closed the socket")
            chunks += chunk
        return bytes(chunks)


class GatewaySide:
    """Asyncio endpoint used by the gateway; one reader task, writes from the event loop only.

    `receive_many` decodes every complete frame that has arrived in one go: the engine writes a step's
    frames together, and the reader task then wakes once per step, not once per frame."""

    _READ_SIZE = 1 << 18

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()  # bytes read but not yet a whole frame
        self._decoded: deque[Event] = deque()  # for `receive`: decoded, not yet handed out

    @classmethod
    async def open(cls, sock: socket.socket) -> GatewaySide:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, command: Command) -> None:
        """Queue a command; never blocks (the socket buffer absorbs bursts, the engine drains it)."""
        if self._writer.is_closing():
            raise ConnectionClosed("engine socket is closed")
        self._writer.write(frame(command))

    async def receive(self) -> Event:
        """The next event."""
        if not self._decoded:
            self._decoded.extend(await self.receive_many())
        return self._decoded.popleft()

    async def receive_many(self) -> list[Event]:
        """Every whole frame that has arrived, at least one, in order (after any `receive` left over)."""
        events: list[Event] = list(self._decoded)
        self._decoded.clear()
        while not events:
            try:
                data = await self._reader.read(self._READ_SIZE)
            except ConnectionError as exc:
                raise ConnectionClosed("engine closed the socket") from exc
            if not data:
                raise ConnectionClosed("engine closed the socket")
            self._buffer += data
            events = self._whole_frames()
        return events

    def _whole_frames(self) -> list[Event]:
        buffer = self._buffer
        events: list[Event] = []
        position, end = 0, len(buffer)
        with memoryview(buffer) as view:
            while end - position >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buffer, position)
                if size > MAX_FRAME_BYTES:
                    raise ConnectionClosed(f"frame of {size} bytes")
                stop = position + _HEADER.size + size
                if stop > end:
                    break
                events.append(cast(Event, _event_decoder.decode(view[position + _HEADER.size:stop])))
                position = stop
        del buffer[:position]
        return events

    def close(self) -> None:
        self._writer.close()
