"""The engine's batcher driven in-process on tiny models, for its unit tests (tests/unit/mlx_backend/engine/
test_batcher*.py): the models folder they share, and a harness that submits, steps and reads the events back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from mlx_backend.contract import (
    ChatMessage,
    Delta,
    EngineConfig,
    Event,
    Failed,
    Finished,
    Generate,
    SamplingParams,
    Started,
)
from mlx_backend.engine import model_load
from mlx_backend.engine.batcher import Batcher
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.registry import ModelRegistry
from tests.support import tiny_models as tm

HELLO = (ChatMessage("user", "hello world"),)


def make_models_dir(root: Path) -> Path:
    """The batcher tests' models: tiny ones, one with room for a long prompt, one without a chat template, one
    whose weights do not fit its config, and a deep one (~110 tensors: a staged load of many pieces)."""
    tm.make_tiny_model(root / "tiny")
    tm.make_tiny_model(root / "long", context_length=2048)  # room for an agent-like system prompt
    tm.remove_chat_template(tm.copy_model(root / "tiny", root / "plain"))
    tm.mismatch_shapes(tm.copy_model(root / "tiny", root / "broken"))
    tm.make_tiny_model(root / "deep", num_layers=12, seed=1)
    return root


class BatcherHarness:
    """A Batcher over the models in `models_dir`, its events collected in order. Models load at once (one step
    starts a request), or, with `staged_loads`, in pieces over steps as the engine loads them (no warm-up)."""

    def __init__(self, models_dir: Path, *, budget: int = 0, staged_loads: bool = False, **config: object) -> None:
        self.events: list[Event] = []
        cfg = EngineConfig(**config)  # type: ignore[arg-type]
        registry = ModelRegistry([models_dir], None, False)
        loads = {"warmup": False} if staged_loads else {"load": model_load.load}
        self.batcher = Batcher(cfg, lambda events: Residency(
            registry, budget, 30.0, events=events, prefix_cache_bytes=cfg.prompt_cache_bytes,
            **loads,  # type: ignore[arg-type]
        ), self.events.append)

    @property
    def residency(self) -> Residency:
        return self.batcher.residency

    def submit(self, rid: str, model: str = "tiny", messages: tuple[ChatMessage, ...] | None = HELLO,
               prompt: str | None = None, fault: str | None = None, prediction: str | None = None,
               **params: object) -> None:
        params.setdefault("max_tokens", 12)
        params.setdefault("temperature", 0.0)
        sampling = SamplingParams(**params)  # type: ignore[arg-type]
        if prompt is not None:
            messages = None
        self.batcher.submit(Generate(rid, model, sampling, messages=messages, prompt=prompt, fault=fault,
                                     prediction=prediction))

    def run(self, max_steps: int = 2000) -> None:
        """Step until no work is left."""
        for _ in range(max_steps):
            if not self.batcher.has_work():
                return
            self.batcher.step()
        raise AssertionError("the batcher did not finish")

    def step_until(self, done: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Step as the worker does (a load that only reads on its thread is waited on briefly)."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError("not done in time")
            wait = self.batcher.idle_timeout()
            if wait:
                time.sleep(wait)
            self.batcher.step()

    def events_of(self, rid: str) -> list[Event]:
        """Every event naming the request (its model's Loading events too)."""
        return [e for e in self.events if getattr(e, "request_id", None) == rid]

    def of(self, rid: str) -> list[Event]:
        """The request's generation: Started, Deltas, then Finished or Failed."""
        kinds = Started | Delta | Finished | Failed
        return [e for e in self.events if isinstance(e, kinds) and e.request_id == rid]

    def text(self, rid: str) -> str:
        return "".join(e.text for e in self.of(rid) if isinstance(e, Delta))

    def deltas(self, rid: str) -> int:
        return sum(1 for e in self.of(rid) if isinstance(e, Delta))

    def ended(self, rid: str) -> bool:
        return any(isinstance(e, Finished | Failed) for e in self.of(rid))

    def end(self, rid: str) -> Finished | Failed:
        last = self.of(rid)[-1]
        assert isinstance(last, Finished | Failed)
        return last

    def started(self, rid: str) -> Started:
        first = self.of(rid)[0]
        assert isinstance(first, Started)
        return first
