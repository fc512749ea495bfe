"""The batcher with staged model loads, in-process on tiny models: a stream keeps decoding while another model
loads, requests for loaded models are not held behind a load, the KV cache is admitted against the memory
budget, and the operator's commands are answered once done."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlx_backend.engine.residency.load_queue as load_queue
from mlx_backend.contract import (
    Failed,
    Finished,
    Heartbeat,
    Loading,
    ModelControl,
    ModelControlDone,
    Started,
)
from mlx_backend.engine import model_check
from mlx_backend.engine.control import Controls
from tests.support.batcher_harness import BatcherHarness


@pytest.fixture
def engine(models_dir: Path) -> Iterator[BatcherHarness]:
    running = BatcherHarness(models_dir, staged_loads=True, max_running=4)
    yield running
    running.batcher.shutdown()


def test_a_stream_keeps_decoding_while_another_model_loads(
    engine: BatcherHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(load_queue, "PIECE_S", 0.0)  # the smallest pieces: one tensor per step
    gate = threading.Event()
    real = model_check.load_tokenizer

    def held_tokenizer(*args: object, **kwargs: object) -> object:
        gate.wait(30)  # the loader thread is still reading
        return real(*args, **kwargs)  # type: ignore[no-untyped-call]

    engine.submit("a", max_tokens=400)
    engine.step_until(lambda: engine.deltas("a") > 0)
    monkeypatch.setattr(model_check, "load_tokenizer", held_tokenizer)
    engine.submit("b", model="deep", max_tokens=3)
    per_step: list[tuple[str | None, int]] = []  # (the load's stage, a's deltas so far) after each step
    for _ in range(30):
        engine.batcher.step()
        load = engine.residency.report({}).load
        per_step.append((load.stage if load else None, engine.deltas("a")))
    assert all(stage == "reading" for stage, _ in per_step)
    assert per_step[-1][1] - per_step[0][1] >= 25  # a token (almost) every step while the files are read
    assert isinstance(engine.events_of("b")[0], Loading)
    gate.set()
    while not any(isinstance(e, Started) for e in engine.of("b")):
        before = engine.deltas("a")
        engine.batcher.step()
        load = engine.residency.report({}).load
        per_step.append((load.stage if load else None, engine.deltas("a") - before))
    loading_steps = [made for stage, made in per_step[30:] if stage == "loading"]
    assert len(loading_steps) > 50  # the tensors went in over many steps
    assert sum(1 for made in loading_steps if made) >= len(loading_steps) - 2  # and a decoded during them
    engine.step_until(lambda: engine.ended("a") and engine.ended("b"))
    assert isinstance(engine.of("b")[-1], Finished)


def test_a_request_for_a_loaded_model_is_not_held_behind_a_load(
    engine: BatcherHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.submit("warm", max_tokens=2)
    engine.step_until(lambda: engine.ended("warm"))
    gate = threading.Event()
    real = model_check.load_tokenizer
    monkeypatch.setattr(model_check, "load_tokenizer", lambda *a, **k: gate.wait(30) and real(*a, **k))
    engine.submit("cold", model="deep", max_tokens=2)
    engine.submit("hot", max_tokens=2)  # behind the one that waits for its load, in order of arrival
    engine.step_until(lambda: engine.ended("hot"), timeout_s=10)
    assert not engine.ended("cold")
    gate.set()
    engine.step_until(lambda: engine.ended("cold"))
    assert isinstance(engine.of("cold")[-1], Finished)


def test_the_kv_cache_is_admitted_against_the_memory_budget(models_dir: Path) -> None:
    probe = BatcherHarness(models_dir, staged_loads=True)
    probe.residency.get("tiny")
    weights, per_token = probe.residency.ledger.weights["tiny"], probe.residency.ledger.per_token("tiny")
    # tiny: 2 layers, 2 KV heads, head dim 16; float16 weights computed in float32 on the CPU (4 bytes)
    assert per_token == 2 * 2 * 2 * 16 * 4
    # The budget holds the weights and one row of 256 tokens.
    engine = BatcherHarness(models_dir, staged_loads=True, budget=weights + 256 * per_token, max_running=4)
    try:
        engine.submit("huge", max_tokens=400)  # prompt + 400 > 256 tokens: could never fit
        engine.submit("a", max_tokens=20)
        engine.submit("b", max_tokens=20)  # fits alone, not beside a: waits for it
        engine.step_until(lambda: all(engine.ended(r) for r in ("huge", "a", "b")))
        huge = engine.events_of("huge")
        assert [type(e) for e in huge if not isinstance(e, Loading)] == [Failed]
        assert isinstance(huge[-1], Failed) and huge[-1].code == "memory_budget_exceeded"
        assert huge[-1].param == "max_tokens"
        a_end = engine.events.index(engine.of("a")[-1])
        b_start = engine.events.index(next(e for e in engine.of("b") if isinstance(e, Started)))
        assert a_end < b_start
        assert isinstance(engine.of("b")[-1], Finished)
        assert engine.residency.ledger.kv_bytes() == 0
    finally:
        engine.batcher.shutdown()


def test_the_operator_commands_are_answered_once_done(engine: BatcherHarness) -> None:
    controls = Controls(engine.residency, engine.events.append, engine.batcher.busy_models, engine.batcher.heartbeat)

    def answer(rid: str) -> ModelControlDone:
        done = [e for e in engine.events if isinstance(e, ModelControlDone) and e.request_id == rid]
        assert len(done) == 1
        before = engine.events[engine.events.index(done[0]) - 1]
        assert isinstance(before, Heartbeat)  # the gateway sees the effect before the answer
        return done[0]

    controls.handle(ModelControl("c1", "pin", "deep"))
    assert not [e for e in engine.events if isinstance(e, ModelControlDone)]  # not before it is loaded
    engine.step_until(lambda: any(isinstance(e, ModelControlDone) for e in engine.events))
    assert answer("c1").code is None
    assert [m.pinned for m in engine.batcher.heartbeat().loaded if m.id == "deep"] == [True]
    controls.handle(ModelControl("c2", "load", "nope"))
    assert answer("c2").code == "model_not_found"
    engine.submit("busy", model="deep", max_tokens=200)
    engine.step_until(lambda: engine.deltas("busy") > 0)
    controls.handle(ModelControl("c3", "unload", "deep"))
    assert answer("c3").code == "model_busy"
    engine.batcher.abort("busy")
    controls.handle(ModelControl("c4", "unpin", "deep"))
    assert answer("c4").code is None
    controls.handle(ModelControl("c5", "unload", "deep"))
    assert answer("c5").code is None
    assert [m.id for m in engine.batcher.heartbeat().loaded] == []
