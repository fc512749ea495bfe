"""The real engine process end to end: `python -m mlx_backend.engine.worker` on a socketpair, a tiny model,
and the faults that stand for native failures (abort, stall, an exception inside the step)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from mlx_backend import ipc
from mlx_backend.contract import (
    Abort,
    ChatMessage,
    Command,
    CountPrompt,
    Delta,
    EngineConfig,
    Event,
    Failed,
    Finished,
    Generate,
    Heartbeat,
    Loading,
    ModelEvent,
    PromptCount,
    Ready,
    SamplingParams,
    Shutdown,
    Started,
)
from tests.support import tiny_models as tm

REPO = Path(__file__).resolve().parents[4]
_decoder = msgspec.msgpack.Decoder(Event)


class Engine:
    """A spawned worker and the gateway's end of its socket (blocking, for tests)."""

    def __init__(self, config: EngineConfig) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_backend.engine.worker", "--fd", str(theirs.fileno()),
             "--config", msgspec.json.encode(config).decode()],
            pass_fds=(theirs.fileno(),), cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        theirs.close()
        self.heartbeats: list[Heartbeat] = []
        self.model_events: list[ModelEvent] = []
        self.pending: deque[Event] = deque()
        self.ready = self.next(timeout=60)
        assert isinstance(self.ready, Ready)

    def send(self, command: Command) -> None:
        self.sock.sendall(ipc.frame(command))

    def _receive(self, deadline: float) -> Event:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        (size,) = ipc._HEADER.unpack(self._read(ipc._HEADER.size))
        event: Event = _decoder.decode(self._read(size))
        if isinstance(event, Heartbeat):
            self.heartbeats.append(event)
        return event

    def next(self, timeout: float = 30) -> Event:
        """The next event but heartbeats and model events (kept in self.heartbeats, self.model_events)."""
        if self.pending:
            return self.pending.popleft()
        deadline = time.monotonic() + timeout
        while True:
            event = self._receive(deadline)
            if isinstance(event, ModelEvent):
                self.model_events.append(event)
            elif not isinstance(event, Heartbeat):
                return event

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("engine closed the socket")
            data += chunk
        return data

    def until_end(self, rid: str, timeout: float = 30) -> list[Event]:
        events: list[Event] = []
        while True:
            event = self.next(timeout)
            if getattr(event, "request_id", None) == rid:  # model events have none
                events.append(event)
                if isinstance(event, Finished | Failed):
                    return events

    def wait_heartbeats(self, count: int, timeout: float = 10) -> list[Heartbeat]:
        """The next `count` heartbeats; other events wait in self.pending for next()."""
        start = len(self.heartbeats)
        deadline = time.monotonic() + timeout
        while len(self.heartbeats) < start + count:
            event = self._receive(deadline)
            if not isinstance(event, Heartbeat):
                self.pending.append(event)
        return self.heartbeats[start:]

    def wait_exit(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def generate(rid: str, max_tokens: int = 8, fault: str | None = None, **params: object) -> Generate:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)  # type: ignore[arg-type]
    return Generate(rid, "tiny", sampling, messages=(ChatMessage("user", "hello world"),), fault=fault)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tm.make_tiny_model(root / "tiny")
    return root


def config(models_dir: Path, **overrides: object) -> EngineConfig:
    base: dict[str, object] = {"models_dirs": (str(models_dir),), "include_demo_model": False,
                               "heartbeat_interval_s": 0.05, "allow_fault_injection": True}
    return EngineConfig(**(base | overrides))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Iterator[Engine]:
    """One engine shared by the tests that leave it healthy."""
    running = Engine(config(models_dir))
    yield running
    running.close()


def test_ready_and_heartbeats(engine: Engine) -> None:
    assert isinstance(engine.ready, Ready)
    assert engine.ready.pid == engine.proc.pid
    assert engine.ready.device == "cpu"
    assert engine.ready.mlx_lm_version.count(".") == 2
    beats = engine.wait_heartbeats(3)
    assert len(beats) == 3
    # Heartbeats start at Ready, before mlx-lm is imported; the budget shows once the cache exists.
    deadline = time.monotonic() + 20
    while engine.heartbeats[-1].memory_budget_bytes == 0 and time.monotonic() < deadline:
        engine.wait_heartbeats(1)
    assert engine.heartbeats[-1].memory_budget_bytes > 0


def test_generate_through_the_socket(engine: Engine) -> None:
    engine.send(generate("g1", max_tokens=6))
    events = engine.until_end("g1")
    assert events[0] == Loading("g1", "tiny")  # the first request of a model hears that it loads
    assert isinstance(events[1], Started)
    end = events[-1]
    assert isinstance(end, Finished)
    assert end.completion_tokens == sum(e.tokens for e in events if isinstance(e, Delta))
    loaded = engine.wait_heartbeats(1)[-1].loaded
    assert [m.id for m in loaded] == ["tiny"]


def test_abort_through_the_socket(engine: Engine) -> None:
    engine.send(generate("long", max_tokens=400))
    assert isinstance(engine.next(), Started)
    engine.send(Abort("long"))
    end = engine.until_end("long")[-1]
    assert isinstance(end, Finished) and end.finish_reason == "abort"


def test_unknown_model_fails_cleanly(engine: Engine) -> None:
    engine.send(Generate("x", "missing", SamplingParams(max_tokens=3), prompt="hi"))
    (failed,) = engine.until_end("x")
    assert isinstance(failed, Failed) and failed.code == "model_not_found" and failed.param == "model"


def test_raise_fault_fails_one_request_and_the_engine_keeps_serving(engine: Engine) -> None:
    engine.send(generate("ok", max_tokens=20))
    engine.send(generate("bad", fault="raise"))
    ends: dict[str, Event] = {}
    while len(ends) < 2:
        event = engine.next()
        if isinstance(event, Finished | Failed):
            ends[event.request_id] = event
    assert isinstance(ends["bad"], Failed) and ends["bad"].code == "internal_error"
    assert isinstance(ends["ok"], Finished)
    engine.send(generate("after", max_tokens=2))
    assert isinstance(engine.until_end("after")[-1], Finished)
    assert engine.proc.poll() is None


def test_count_prompt_counts_what_running_the_request_prompts(engine: Engine) -> None:
    messages = (ChatMessage("system", "be brief"), ChatMessage("user", "hello world, how are you"))
    command = Generate("c1", "tiny", SamplingParams(max_tokens=1, temperature=0.0), messages=messages)
    engine.send(CountPrompt(command))
    counted = engine.next()
    assert isinstance(counted, PromptCount) and counted.request_id == "c1"
    engine.send(Generate("c2", "tiny", command.params, messages=messages))
    started = next(e for e in engine.until_end("c2") if isinstance(e, Started))
    assert counted.prompt_tokens == started.prompt_tokens > 5


def test_count_prompt_of_an_unknown_model_fails_as_a_request_would(engine: Engine) -> None:
    engine.send(CountPrompt(Generate("c3", "missing", SamplingParams(max_tokens=1), prompt="hi")))
    failed = engine.next()
    assert isinstance(failed, Failed) and failed.request_id == "c3" and failed.code == "model_not_found"


def test_shutdown_aborts_running_requests_and_exits_zero(models_dir: Path) -> None:
    engine = Engine(config(models_dir))
    try:
        engine.send(generate("r", max_tokens=400))
        assert isinstance(engine.next(), Loading)
        assert isinstance(engine.next(), Started)
        engine.send(Shutdown())
        end = engine.until_end("r")[-1]
        assert isinstance(end, Finished) and end.finish_reason == "abort"
        assert engine.wait_exit() == 0
    finally:
        engine.close()


def test_gateway_gone_means_engine_gone(models_dir: Path) -> None:
    engine = Engine(config(models_dir))
    try:
        engine.send(generate("r", max_tokens=400))
        engine.sock.close()  # the gateway died
        started = time.monotonic()
        assert engine.wait_exit(timeout=5) is not None
        assert time.monotonic() - started < 3
    finally:
        engine.close()


def test_signals_to_the_process_group_are_left_to_the_gateway(engine: Engine) -> None:
    engine.proc.send_signal(signal.SIGINT)
    engine.proc.send_signal(signal.SIGTERM)
    engine.send(generate("after-signals", max_tokens=2))
    assert isinstance(engine.until_end("after-signals")[-1], Finished)
    assert engine.proc.poll() is None


def test_abort_fault_kills_the_process_with_sigabrt(models_dir: Path) -> None:
    engine = Engine(config(models_dir))
    try:
        engine.send(generate("boom", fault="abort"))
        assert engine.wait_exit() == -signal.SIGABRT
    finally:
        engine.close()


def test_stall_fault_stops_progress_but_not_heartbeats(models_dir: Path) -> None:
    engine = Engine(config(models_dir))
    try:
        engine.send(generate("warm", max_tokens=2))
        engine.until_end("warm")
        engine.send(generate("stuck", fault="stall"))
        engine.send(generate("behind", max_tokens=2))
        engine.wait_heartbeats(4)
        beats = engine.wait_heartbeats(10, timeout=3)  # 10 x 0.05 s: the heartbeat thread goes on
        assert len({b.progress for b in beats}) == 1  # the MLX thread does not
        assert beats[-1].waiting >= 1  # the stuck request still counts as work
        assert engine.proc.poll() is None
    finally:
        engine.close()


def test_faults_need_permission(models_dir: Path) -> None:
    engine = Engine(config(models_dir, allow_fault_injection=False))
    try:
        engine.send(generate("a", fault="abort", max_tokens=2))
        assert isinstance(engine.until_end("a")[-1], Finished)
        assert engine.proc.poll() is None
    finally:
        engine.close()


def test_the_mlx_threads_events_wait_for_the_passs_end_but_loading_and_started_go_at_once() -> None:
    import select

    from mlx_backend.engine.channel import Channel

    ours, theirs = socket.socketpair()
    channel = Channel(theirs)

    def arrived() -> list[Event]:
        events: list[Event] = []
        while select.select([ours], [], [], 0.05)[0]:
            (size,) = ipc._HEADER.unpack(ours.recv(ipc._HEADER.size, socket.MSG_WAITALL))
            events.append(_decoder.decode(ours.recv(size, socket.MSG_WAITALL)))
        return events

    channel.emit(Delta("a", "x", 1))
    channel.emit(Finished("a", "stop", 1, 1, 0))
    assert arrived() == []  # held until the loop's pass ends
    channel.emit(Loading("b", "m"))  # a model load may follow: out now, with what was held before it
    assert arrived() == [Delta("a", "x", 1), Finished("a", "stop", 1, 1, 0), Loading("b", "m")]
    channel.emit(Started("b", 3, 0))  # a prefill may follow
    assert arrived() == [Started("b", 3, 0)]
    channel.emit(Delta("b", "y", 1))
    channel.flush()
    assert arrived() == [Delta("b", "y", 1)]
    ours.close()
    theirs.close()
