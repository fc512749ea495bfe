"""A minimal HTTP/1.1 client for chat completions on raw asyncio sockets, light enough that it is not what
a streaming measurement measures: no parsing beyond finding text events, one clock stamp per chunk read
(`time.monotonic_ns`, CLOCK_MONOTONIC, the clock of the server's timeline).

`run(...)` runs `concurrency` clients that each send `per_client` requests in turn, optionally dealt over
several processes (one Python process reads a few thousand events a second while sharing the machine).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    stream: bool
    rid: str = ""  # the server's request id (x-request-id)
    status: int = 0
    sent_ns: int = 0
    first_ns: int | None = None  # first text event (streamed) or the body (not streamed)
    done_ns: int = 0
    tokens: int = 0  # usage.completion_tokens
    events: list[int] = field(default_factory=list)  # read time of each text event (streamed)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.tokens > 0


def _text_event(event: bytes) -> bool:
    return b'"content":"' in event and b'"content":""' not in event


async def one(host: str, port: int, body: dict[str, Any], timeout_s: float) -> Result:
    stream = bool(body.get("stream"))
    result = Result(stream)
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            result.sent_ns = time.monotonic_ns()
            writer.write(head + payload)
            raw = await reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            result.status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
            result.rid = headers.get("x-request-id", "")
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body_bytes = await _chunked(reader, result)
            else:
                body_bytes = await reader.readexactly(int(headers.get("content-length", "0")))
                result.first_ns = time.monotonic_ns()
            result.done_ns = time.monotonic_ns()
            if result.status != 200:
                result.error = body_bytes[:200].decode(errors="replace")
            elif not stream:
                result.tokens = int(json.loads(body_bytes)["usage"]["completion_tokens"])
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, KeyError, TypeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.done_ns = time.monotonic_ns()
    finally:
        if writer is not None:
            writer.close()
    return result


async def _chunked(reader: asyncio.StreamReader, result: Result) -> bytes:
    """Read a chunked body, stamping each chunk; SSE text events are counted, usage read at the end."""
    pending = b""
    everything: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            break
        data = (await reader.readexactly(size + 2))[:-2]
        now = time.monotonic_ns()
        if not result.stream:
            everything.append(data)
            continue
        pending += data
        *complete, pending = pending.split(b"\n\n")
        for event in complete:
            if _text_event(event):
                result.events.append(now)
                if result.first_ns is None:
                    result.first_ns = now
            elif b'"usage":{' in event:
                result.tokens = int(json.loads(event[len(b"data: "):])["usage"]["completion_tokens"])
            elif b'"error"' in event:
                result.error = event[:200].decode(errors="replace")
    return b"".join(everything)


async def _clients(host: str, port: int, bodies: list[dict[str, Any]], concurrency: int, per_client: int,
                   timeout_s: float, start_at: float) -> list[Result]:
    await asyncio.sleep(max(0.0, start_at - time.time()))

    async def client(index: int) -> list[Result]:
        return [await one(host, port, bodies[(k * concurrency + index) % len(bodies)], timeout_s)
                for k in range(per_client)]

    parts = await asyncio.gather(*(client(i) for i in range(concurrency)))
    return [r for part in parts for r in part]


def _share(*args: Any) -> list[Result]:
    return asyncio.run(_clients(*args))


def run(host: str, port: int, bodies: list[dict[str, Any]], concurrency: int, per_client: int = 1,
        timeout_s: float = 120.0, processes: int = 1) -> list[Result]:
    processes = max(1, min(processes, concurrency))
    if processes == 1:
        return asyncio.run(_clients(host, port, bodies, concurrency, per_client, timeout_s, 0.0))
    start_at = time.time() + 0.3 + 0.05 * processes
    shares = [len(range(j, concurrency, processes)) for j in range(processes)]
    jobs = [(host, port, bodies[j::processes] or bodies, n, per_client, timeout_s, start_at)
            for j, n in enumerate(shares) if n]
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        return [r for part in pool.starmap(_share, jobs) for r in part]
