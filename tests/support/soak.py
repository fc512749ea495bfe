"""Bookkeeping and client helpers for soak tests (tests/integration/test_day_of_use.py).

Every request a step sends ends as one `Outcome`, a short `kind` ("200 stop", "429 + Retry-After",
"stream request_timeout error + [DONE]", ...) and a detail. A step names the kinds it allows (the documented
answers for its situation) and the ones it requires (what it exists to provoke); the `Ledger` counts kinds per
step, lists everything else as unexpected, and prints a table of it all with the processes' RSS per round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

# -- outcomes and the ledger -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    kind: str
    detail: str = ""


@dataclass
class StepRecord:
    round: str
    name: str
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())


@dataclass(frozen=True)
class RssSample:
    round: str
    gateway_mb: float
    engine_mb: float


class Ledger:
    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.rss: list[RssSample] = []

    def record(self, round_name: str, name: str, outcomes: Iterable[Outcome], seconds: float, *,
               allowed: Iterable[str], required: Iterable[str] = (), problems: Iterable[str] = ()) -> StepRecord:
        """Count a step's outcomes; anything not allowed, a required kind that never showed, and any problem
        found by the step itself (leftover requests, a failed check) is unexpected."""
        allowed_kinds, record = set(allowed), StepRecord(round_name, name, seconds=seconds)
        for outcome in outcomes:
            record.outcomes[outcome.kind] += 1
            if outcome.kind not in allowed_kinds:
                record.unexpected.append(f"{outcome.kind}: {outcome.detail}" if outcome.detail else outcome.kind)
        record.unexpected += [f"never saw '{kind}'" for kind in required if not record.outcomes[kind]]
        record.unexpected += list(problems)
        self.steps.append(record)
        return record

    @property
    def unexpected(self) -> list[str]:
        return [f"round {s.round} / {s.name}: {u}" for s in self.steps for u in s.unexpected]

    def table(self) -> str:
        rows = [("round", "step", "sent", "outcomes", "unexpected", "seconds")]
        for s in self.steps:
            kinds = [f"{n:>2} x {kind}" for kind, n in sorted(s.outcomes.items())] or ["-"]
            rows.append((s.round, s.name, str(s.sent), kinds[0], str(len(s.unexpected)), f"{s.seconds:.1f}"))
            rows += [("", "", "", kind, "", "") for kind in kinds[1:]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        lines += ["", "RSS after each round (MB; every request ended, before the next idle gap)",
                  f"{'round':<10}{'gateway':>10}{'engine':>10}"]
        lines += [f"{r.round:<10}{r.gateway_mb:>10.1f}{r.engine_mb:>10.1f}" for r in self.rss]
        details = self.unexpected
        lines += ["", f"unexpected: {len(details)}", *(f"  {d}" for d in details)]
        return "\n".join(lines)


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


# -- judging what came back --------------------------------------------------------------------------------


def judge_error(exc: BaseException) -> Outcome:
    """What an SDK exception says about the server's answer, as a kind."""
    if isinstance(exc, openai.APIStatusError):
        code = _error_code(exc.body)
        if exc.status_code in (429, 503):  # both must tell the client when to come back
            retry = exc.response.headers.get("retry-after")
            return Outcome(f"{exc.status_code} {code} + Retry-After" if retry else f"{exc.status_code} {code} "
                           "WITHOUT Retry-After", exc.message[:120])
        return Outcome(f"{exc.status_code} {code}", exc.message[:120])
    if isinstance(exc, openai.APITimeoutError):
        return Outcome("client timeout", "the client gave up waiting")
    if isinstance(exc, openai.APIConnectionError):
        return Outcome("connection error", repr(exc.__cause__ or exc)[:160])
    if isinstance(exc, openai.APIError):  # an error event inside a stream, raised by the SDK
        return Outcome(f"stream error {_error_code(exc.body)} (sdk)", exc.message[:120])
    return Outcome(f"client exception {type(exc).__name__}", str(exc)[:160])


def _error_code(body: object) -> str | None:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            code = error.get("code")
            return code if isinstance(code, str) else None
    return None


def judge_completion(reply: Any, *, max_tokens: int | None = None, chat: bool = True) -> Outcome:
    """A whole (non-streamed) answer: right object, one choice, usage adding up, within max_tokens."""
    expected_object = "chat.completion" if chat else "text_completion"
    usage = reply.usage
    finish = reply.choices[0].finish_reason if reply.choices else None
    problems = []
    if reply.object != expected_object:
        problems.append(f"object {reply.object!r}")
    if len(reply.choices) != 1 or finish not in ("stop", "length"):
        problems.append(f"choices {reply.choices!r}")
    if usage is None or usage.total_tokens != usage.prompt_tokens + usage.completion_tokens:
        problems.append(f"usage {usage!r}")
    elif max_tokens is not None and usage.completion_tokens > max_tokens:
        problems.append(f"{usage.completion_tokens} completion tokens > max_tokens {max_tokens}")
    if problems:
        return Outcome("200 malformed", "; ".join(problems))
    return Outcome(f"200 {finish}")


@dataclass
class SseResult:
    outcome: Outcome
    text: str = ""
    completion_tokens: int | None = None
    chunks: int = 0


def judge_sse(events: list[str], *, chat: bool = True, include_usage: bool = False) -> SseResult:
    """A stream's `data:` payloads in order, judged against OpenAI's wire invariants: every chunk the right
    object with one id, finish_reason exactly once, the usage chunk after it when asked for, `[DONE]` last; or
    valid chunks, then one error event, then `[DONE]`."""
    if not events or events[-1] != "[DONE]":
        return SseResult(Outcome("stream cut without [DONE]", f"{len(events)} events, last {events[-1:]!r}"))
    payloads = []
    for raw in events[:-1]:
        try:
            payloads.append(json.loads(raw))
        except ValueError:
            return SseResult(Outcome("stream malformed", f"not JSON: {raw[:80]!r}"))
    error = None
    if payloads and "error" in payloads[-1]:
        error = payloads.pop()["error"]
    expected_object = "chat.completion.chunk" if chat else "text_completion"
    ids = {p.get("id") for p in payloads}
    finishes = [c.get("finish_reason") for p in payloads for c in p.get("choices", []) if c.get("finish_reason")]
    texts = [(c.get("delta", {}).get("content") if chat else c.get("text")) or ""
             for p in payloads for c in p.get("choices", [])]
    usage = [p["usage"] for p in payloads if p.get("usage")]
    problems = []
    if any(p.get("object") != expected_object for p in payloads) or len(ids) > 1:
        problems.append(f"objects/ids {[p.get('object') for p in payloads][:3]} {ids}")
    if any("error" in p for p in payloads):
        problems.append("an error event before the last one")
    if error is not None:
        if finishes:
            problems.append(f"an error after finish_reason {finishes}")
        kind = f"stream {error.get('code')} error + [DONE]"
    else:
        if len(finishes) != 1:
            problems.append(f"finish_reason {len(finishes)} times")
        if include_usage and (len(usage) != 1 or payloads[-1].get("choices") != []):
            problems.append("no usage chunk (with choices []) at the end")
        kind = f"stream {finishes[0] if finishes else None} + [DONE]"
    tokens = usage[-1]["completion_tokens"] if usage else None
    if usage and usage[-1]["total_tokens"] != usage[-1]["prompt_tokens"] + usage[-1]["completion_tokens"]:
        problems.append(f"usage does not add up: {usage[-1]}")
    if problems:
        return SseResult(Outcome("stream malformed", "; ".join(problems)))
    return SseResult(Outcome(kind, error.get("message", "")[:120] if error else ""), "".join(texts), tokens,
                     len(payloads))


async def sse_events(response: Any, *, leave_at: float | None = None,
                     leave_after_texts: int | None = None) -> AsyncIterator[str]:
    """The `data:` payloads of an SDK streaming response (`with_streaming_response`); optionally stops early,
    at a monotonic time or after some chunks with text (the caller then closes the response)."""
    texts = 0
    async for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        yield payload
        with contextlib.suppress(ValueError, AttributeError):
            choices = json.loads(payload).get("choices") or []
            texts += any((c.get("delta") or {}).get("content") or c.get("text") for c in choices)
        if leave_after_texts is not None and texts >= leave_after_texts:
            return
        if leave_at is not None and time.monotonic() >= leave_at:
            return


# -- the server's view ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    gateway_running: int
    gateway_waiting: int
    engine_running: int
    engine_waiting: int

    @property
    def quiet(self) -> bool:
        return not (self.gateway_running or self.gateway_waiting or self.engine_running or self.engine_waiting)


def counts_of(health: dict[str, Any]) -> Counts:
    engine = health.get("engine", {})
    return Counts(health["requests_running"], health["requests_waiting"],
                  engine.get("requests_running", 0), engine.get("requests_waiting", 0))


class Watcher:
    """/health through its own client, never the SDK's pool."""

    def __init__(self, base_url: str) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, timeout=5)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def health(self) -> tuple[int, dict[str, Any]]:
        response = await self._client.get("/health")
        return response.status_code, response.json()

    async def counts(self) -> Counts:
        return counts_of((await self.health())[1])

    async def wait_for(self, condition: Any, timeout_s: float, poll_s: float = 0.05) -> Counts | None:
        """Poll the counts until `condition(counts)`; the last counts if it never held within the time."""
        deadline = time.monotonic() + timeout_s
        while True:
            counts = await self.counts()
            if condition(counts):
                return None
            if time.monotonic() > deadline:
                return counts
            await asyncio.sleep(poll_s)

    async def leftovers(self, timeout_s: float) -> list[str]:
        """A problem unless gateway and engine both count nothing running or waiting within the time (the
        engine's counts come with its heartbeats, every 0.25 s)."""
        left = await self.wait_for(lambda c: c.quiet, timeout_s)
        return [] if left is None else [f"requests left {timeout_s:g}s after the step: {left}"]


# -- raw sockets: what no SDK does ---------------------------------------------------------------------------


def _request_bytes(path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(payload)}\r\n\r\n")
    return head.encode() + payload


def dechunk(data: bytes) -> bytes:
    """The body of an HTTP/1.1 chunked transfer (what a raw socket reads after the headers)."""
    body, rest = b"", data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2:]
    return body


class UnreadStream:
    """A client that sends a streaming request, reads the response headers, and then reads nothing: its
    receive buffer is made small, so what the server sends piles up on the server's side."""

    def __init__(self, port: int, body: dict[str, Any]) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(_request_bytes("/v1/chat/completions", body))
        self.head = b""
        while b"\r\n\r\n" not in self.head:  # one byte at a time: not a byte of the body is read
            byte = self.sock.recv(1)
            if not byte:
                break
            self.head += byte

    @property
    def status(self) -> int:
        parts = self.head.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    def read_rest(self) -> list[str]:
        """Read everything the server kept for it, to the end; its `data:` payloads."""
        data = b""
        with contextlib.suppress(TimeoutError):
            self.sock.settimeout(10)
            while chunk := self.sock.recv(65536):
                data += chunk
        self.sock.close()
        chunked = b"transfer-encoding: chunked" in self.head.lower()
        text = (dechunk(data) if chunked else data).decode(errors="replace")
        return [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]


def send_and_vanish(port: int, body: dict[str, Any], reset: bool) -> None:
    """Send a whole request and close the connection at once, before any answer: with FIN, or with RST
    (SO_LINGER 0, as a client killed mid-request leaves it)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(_request_bytes("/v1/chat/completions", body))


def partial_headers(port: int, wait_s: float) -> tuple[float, bytes]:
    """Send half a request's headers and nothing more; return how long until the server cut the connection
    and what it said (an HTTP 408 or nothing)."""
    return _go_quiet(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl", wait_s)


def partial_body(port: int, body: dict[str, Any], wait_s: float) -> tuple[float, bytes]:
    """Send a request's headers and half its body, then nothing more (as partial_headers)."""
    request = _request_bytes("/v1/chat/completions", body)
    return _go_quiet(port, request[: len(request) - len(json.dumps(body)) // 2], wait_s)


def _go_quiet(port: int, data: bytes, wait_s: float) -> tuple[float, bytes]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        started, said = time.monotonic(), b""
        sock.settimeout(wait_s)
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := sock.recv(4096):
                said += chunk
        return time.monotonic() - started, said


def tensor_bytes(folder: Path) -> int:
    """The bytes of a model's tensors, as the engine's memory budget counts them on the CPU (safetensors headers;
    float16 tensors twice, held as float32: mlx_backend/engine/model_check.py)."""
    total = 0
    for path in folder.glob("model*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum((end - start) * (2 if t["dtype"] == "F16" else 1) for name, t in header.items()
                     if name != "__metadata__" for start, end in [t["data_offsets"]])
    return total
