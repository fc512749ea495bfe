"""A per-token timeline for benchmarks: when each token was sampled, sent, received, handed to HTTP and sent
on, all on CLOCK_MONOTONIC (`time.monotonic_ns`), which every process of one Linux host reads alike.

Off unless a folder is given (`mlx-gateway serve --trace-tokens DIR`, which hands it to the engine through
`EngineConfig.trace_tokens`); off, each hook is one module-attribute test. On, each process keeps its
records in memory as tuples and writes them as JSON lines to its own file in the folder
(`<role>-<pid>.jsonl`) every few thousand records and at exit. `tests/benchmarks/timeline.py` joins the
files and prints the table; docs/benchmarks.md describes the records.

Records (first field the kind; times in ns):
  E rid cum n launched sampled emitted sent_begin sent_end
                                                    engine: a Delta frame of n tokens, cum tokens so far;
                                                    launched: the next step queued, the wait for this
                                                    one's token begins (solo path only; else 0)
  R rid cum n received                              gateway: that frame read and decoded
  Q rid stream admitted                             gateway: a request admitted (stream 1 or 0)
  H rid k cum handed returned                       gateway: text event k (covering tokens up to cum)
                                                    handed to the HTTP layer, and when that returned
  D rid done                                        gateway: a non-streamed body ready
  C rid k received                                  client: text event k arrived
  Z rid stream sent done                            client: a request's send and its end
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

ACTIVE = False  # read by the hooks: `if timeline.ACTIVE: ...`
sampled_ns = 0  # engine: when the MLX thread last had a step's tokens (set by `mark_sampled`)
launched_ns = 0  # engine, solo path: when it last began waiting for a token (set by `mark_launched`)
step_launched_ns = 0  # launched_ns if this step set it, else 0 (the batch path does not)
now = time.monotonic_ns

_FLUSH_EVERY = 4096
_records: list[tuple[Any, ...]] = []
_path: Path | None = None
_lock = threading.Lock()
_encoder = msgspec.json.Encoder()
_tokens: dict[str, int] = {}  # tokens counted so far per request (each process counts its own)


def start(folder: str | os.PathLike[str], role: str) -> Path:
    """Record from now on into `folder/<role>-<pid>.jsonl`; returns that path."""
    global ACTIVE, _path
    directory = Path(folder)
    directory.mkdir(parents=True, exist_ok=True)
    _path = directory / f"{role}-{os.getpid()}.jsonl"
    _path.touch()
    ACTIVE = True
    return _path


def mark_sampled() -> None:
    """The MLX thread has this step's tokens (called right after they are read back from the device)."""
    global sampled_ns, step_launched_ns
    if ACTIVE:
        step_launched_ns = launched_ns if launched_ns > sampled_ns else 0  # 0: this step did not stamp it
        sampled_ns = time.monotonic_ns()


def count(request_id: str, tokens: int) -> int:
    """Add a Delta's tokens to its request's count; returns the count so far (the key frames are joined on)."""
    total = _tokens.get(request_id, 0) + tokens
    _tokens[request_id] = total
    return total


def forget(request_id: str) -> None:
    _tokens.pop(request_id, None)


def mark_launched() -> None:
    """The MLX thread queued the next step and now waits for this one's token (the solo path)."""
    global launched_ns
    if ACTIVE:
        launched_ns = time.monotonic_ns()


def record(*fields: Any) -> None:
    _records.append(fields)
    if len(_records) >= _FLUSH_EVERY:
        flush()


def flush() -> None:
    """Write what is held (any thread; also called at exit)."""
    global _records
    if _path is None:
        return
    with _lock:
        held, _records = _records, []
        if held:
            with _path.open("ab") as file:
                file.write(b"".join(_encoder.encode(r) + b"\n" for r in held))


def stop() -> None:
    global ACTIVE
    flush()
    ACTIVE = False
