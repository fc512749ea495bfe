"""The MLX thread's logic, driven in-process on tiny models: generation, stop strings, abort, context
limits, seeds, penalties, joining a running batch, prefix-cache reuse, and failures that end one request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlx_backend.contract import (
    ChatMessage,
    Delta,
    Failed,
    Finished,
    Generate,
    Heartbeat,
    ModelEvent,
    SamplingParams,
    Started,
)
from tests.support import tiny_models as tm
from tests.support.batcher_harness import HELLO, BatcherHarness
from tests.support.tool_specs import specs


@pytest.fixture
def h(models_dir: Path) -> Iterator[BatcherHarness]:
    # Arrivals start in the very step they can: these tests count steps (gathering has tests of its own).
    harness = BatcherHarness(models_dir, max_running=4, prefill_gather_steps=0)
    yield harness
    harness.batcher.shutdown()


def check_well_formed(h: BatcherHarness, rid: str) -> Finished:
    events = h.of(rid)
    assert isinstance(events[0], Started)
    assert all(isinstance(e, Delta) for e in events[1:-1])
    end = events[-1]
    assert isinstance(end, Finished)
    assert sum(e.tokens for e in events if isinstance(e, Delta)) == end.completion_tokens
    assert end.prompt_tokens == events[0].prompt_tokens
    return end


def test_chat_generation(h: BatcherHarness) -> None:
    h.submit("a", max_tokens=10)
    h.run()
    end = check_well_formed(h, "a")
    assert end.finish_reason in {"length", "stop"}
    assert end.completion_tokens == 10 if end.finish_reason == "length" else end.completion_tokens <= 10
    assert h.text("a").strip()
    assert h.batcher.heartbeat().progress > 10


def test_legacy_prompt_and_max_tokens(h: BatcherHarness) -> None:
    h.submit("a", prompt="the quick brown fox", max_tokens=7)
    h.run()
    end = check_well_formed(h, "a")
    assert (end.finish_reason, end.completion_tokens) == ("length", 7)
    assert end.prompt_tokens == 5  # BOS + four words


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(h: BatcherHarness) -> None:
    h.submit("free", max_tokens=20, presence_penalty=100.0)  # distinct words: every boundary differs
    h.run()
    pieces = [e.text for e in h.of("free") if isinstance(e, Delta) and e.text]
    full = "".join(pieces)
    boundary = len(pieces[0]) + len(pieces[1])
    stop = full[boundary - 2: boundary + 2]  # last chars of one token + first chars of the next
    h.submit("cut", max_tokens=20, presence_penalty=100.0, stop=("zzz-never", stop))
    h.run()
    end = check_well_formed(h, "cut")
    assert end.finish_reason == "stop"
    assert h.text("cut") == full[: full.index(stop)]
    assert stop not in h.text("cut")
    assert end.completion_tokens <= 3


def test_eos_token_ends_with_stop_and_is_not_emitted(models_dir: Path, tmp_path: Path) -> None:
    h = BatcherHarness(models_dir)
    h.submit("probe", max_tokens=3, presence_penalty=100.0)  # three different words
    h.run()
    words = h.text("probe").split()
    tokenizer = h.batcher._states["tiny"].cached.artifacts.tokenizer
    third = tokenizer.encode(words[2], add_special_tokens=False)[0]
    # A copy whose EOS is the third word the model says greedily: generation must stop there.
    folder = tm.copy_model(models_dir / "tiny", tmp_path / "eos")
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [third]
    (folder / "config.json").write_text(json.dumps(config))
    h2 = BatcherHarness(tmp_path)
    h2.submit("a", model="eos", max_tokens=50, presence_penalty=100.0)
    h2.run()
    end = check_well_formed(h2, "a")
    assert (end.finish_reason, end.completion_tokens) == ("stop", 3)
    assert h2.text("a") == " ".join(words[:2])
    h.batcher.shutdown()
    h2.batcher.shutdown()


def test_abort_running_request(h: BatcherHarness) -> None:
    h.submit("a", max_tokens=400)
    for _ in range(5):
        h.batcher.step()
    h.batcher.abort("a")
    end = h.end("a")
    assert isinstance(end, Finished) and end.finish_reason == "abort"
    assert 0 < end.completion_tokens < 400
    assert not h.batcher.has_work()
    assert h.batcher.running == 0
    h.batcher.abort("a")  # twice, or unknown: nothing happens
    h.batcher.abort("nope")
    assert len([e for e in h.of("a") if isinstance(e, Finished)]) == 1


def test_waiting_queue_and_abort_while_waiting(models_dir: Path) -> None:
    h = BatcherHarness(models_dir, max_running=1)
    h.submit("a", max_tokens=30)
    h.submit("b", max_tokens=5)
    h.submit("c", max_tokens=5)
    h.batcher.step()
    assert (h.batcher.running, h.batcher.waiting) == (1, 2)
    assert h.batcher.heartbeat().waiting == 2
    h.batcher.abort("b")
    assert h.of("b") == [Finished("b", "abort", 0, 0, 0)]
    h.run()
    check_well_formed(h, "a")
    check_well_formed(h, "c")
    assert h.events.index(h.end("a")) < h.events.index(h.started("c"))
    h.batcher.shutdown()


def test_concurrent_requests_join_the_running_batch(h: BatcherHarness) -> None:
    h.submit("a", max_tokens=40)
    for _ in range(5):
        h.batcher.step()
    h.submit("b", max_tokens=10)
    h.batcher.step()
    assert h.batcher.running == 2
    assert h.batcher.heartbeat().loaded[0].running == 2
    h.run()
    a, b = check_well_formed(h, "a"), check_well_formed(h, "b")
    assert a.finish_reason == b.finish_reason == "length"
    # b was decoded while a was still running: their deltas interleave
    order = [e.request_id for e in h.events if isinstance(e, Delta)]
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")


def start_batch(h: BatcherHarness, rows: int, max_tokens: int = 40) -> None:
    """`rows` requests that arrive together at an idle engine: they start at once, in one batch."""
    for i in range(rows):
        h.submit(f"running{i}", max_tokens=max_tokens)
    h.batcher.step()
    assert (h.batcher.running, h.batcher.waiting) == (rows, 0)


def test_while_a_batch_decodes_arrivals_gather_for_a_few_steps_then_start_together(models_dir: Path) -> None:
    h = BatcherHarness(models_dir, prefill_gather_steps=3)
    start_batch(h, 3)
    h.submit("b", max_tokens=10)
    h.batcher.step()
    h.submit("c", max_tokens=10)
    for _ in range(2):
        h.batcher.step()
        assert (h.batcher.running, h.batcher.waiting) == (3, 2)  # b waits 3 steps for company; c has come
    h.batcher.step()  # the step after b's three: both start, one prefill pass between them
    assert (h.batcher.running, h.batcher.waiting) == (5, 0)
    h.run()
    assert [check_well_formed(h, r).finish_reason for r in "bc"] == ["length"] * 2
    h.batcher.shutdown()


def test_as_many_arrivals_as_rows_running_start_at_once(models_dir: Path) -> None:
    h = BatcherHarness(models_dir, prefill_gather_steps=1000)
    h.submit("a", max_tokens=40)
    h.batcher.step()
    assert h.batcher.running == 1  # an idle engine starts a lone arrival at once (solo)
    h.submit("b", max_tokens=30)
    h.batcher.step()
    assert h.batcher.waiting == 1  # a lone arrival waits for company, even beside a lone row
    h.submit("c", max_tokens=30)
    h.batcher.step()
    assert (h.batcher.running, h.batcher.waiting) == (3, 0)  # two arrivals, one row running: they start
    h.submit("d", max_tokens=10)
    h.submit("e", max_tokens=10)
    h.batcher.step()
    assert h.batcher.waiting == 2  # two arrivals, three rows running: they wait for company
    h.submit("f", max_tokens=10)
    h.batcher.step()
    assert (h.batcher.running, h.batcher.waiting) == (6, 0)  # three arrivals, three rows running
    h.run()
    assert [check_well_formed(h, r).finish_reason for r in "abcdef"] == ["length"] * 6
    h.batcher.shutdown()


def test_arrivals_that_fill_the_free_slots_start_without_waiting(models_dir: Path) -> None:
    h = BatcherHarness(models_dir, prefill_gather_steps=1000, max_running=5)
    start_batch(h, 3)
    h.submit("b", max_tokens=5)
    h.batcher.step()
    assert h.batcher.waiting == 1  # two slots are free: b waits for one more
    h.submit("c", max_tokens=5)
    h.batcher.step()
    assert (h.batcher.running, h.batcher.waiting) == (5, 0)
    h.run()
    h.batcher.shutdown()


def test_a_request_that_cannot_run_is_refused_at_once_even_while_arrivals_gather(models_dir: Path) -> None:
    h = BatcherHarness(models_dir, prefill_gather_steps=1000)
    start_batch(h, 3)
    h.submit("too-long", prompt="hello " * 600)
    h.submit("nowhere", model="missing")
    assert h.batcher._gathering()  # two arrivals, three rows running: they would wait for company
    h.batcher.step()
    assert h.end("too-long").code == "context_length_exceeded"  # type: ignore[union-attr]
    assert h.end("nowhere").code == "model_not_found"  # type: ignore[union-attr]
    h.batcher.shutdown()


@pytest.mark.parametrize("configured, prefill_batch", [(0, 8), (3, 3)])  # 0: the CPU's default
def test_a_full_prefill_batch_of_arrivals_starts_without_waiting(models_dir: Path, configured: int,
                                                                 prefill_batch: int) -> None:
    h = BatcherHarness(models_dir, prefill_gather_steps=1000, prefill_batch=configured)
    start_batch(h, prefill_batch + 1)
    for i in range(prefill_batch - 1):
        h.submit(f"r{i}", max_tokens=5)
    h.batcher.step()
    assert h.batcher.waiting == prefill_batch - 1  # one short of a prefill batch: they wait for company
    h.submit("last", max_tokens=5)
    h.batcher.step()
    assert (h.batcher.running, h.batcher.waiting) == (2 * prefill_batch + 1, 0)
    assert h.batcher._states["tiny"].generator.prefill_batch_size == prefill_batch
    h.run()
    h.batcher.shutdown()


def test_batched_greedy_matches_alone(h: BatcherHarness) -> None:
    h.submit("alone", max_tokens=15, prompt="the quick brown fox")
    h.run()
    h.submit("x", max_tokens=15, prompt="hello model code")
    h.submit("together", max_tokens=15, prompt="the quick brown fox")
    h.run()
    assert h.text("together") == h.text("alone")


def test_a_lone_request_runs_solo_outside_the_batch(h: BatcherHarness) -> None:
    h.submit("a", max_tokens=10)
    h.batcher.step()
    state = h.batcher._states["tiny"]
    assert state.solo_row is not None and state.solo_row.request.rid == "a"
    assert h.batcher.running == 1 and h.batcher.heartbeat().loaded[0].running == 1
    h.run()
    assert check_well_formed(h, "a").finish_reason == "length"
    assert state.solo_row is None and not state.rows


def test_requests_arriving_together_go_straight_to_the_batch(h: BatcherHarness) -> None:
    h.submit("a", max_tokens=10)
    h.submit("b", max_tokens=10)
    h.batcher.step()
    state = h.batcher._states["tiny"]
    assert state.solo_row is None and len(state.rows) == 2


def join_after(h: BatcherHarness, steps_alone: int) -> None:
    """The request just submitted runs solo for `steps_alone` steps; then a newcomer arrives and both decode in
    the batch, to the end."""
    for _ in range(steps_alone):
        h.batcher.step()
    state = h.batcher._states["tiny"]
    assert state.solo_row is not None
    h.submit("newcomer", max_tokens=30, prompt="hello model code")
    h.batcher.step()
    assert state.solo_row is None and h.batcher.running == 2  # both decode in the batch now
    h.run()


@pytest.mark.parametrize("steps_alone", [1, 2, 7])
@pytest.mark.parametrize(
    "params", [{}, {"presence_penalty": 1.5, "frequency_penalty": 0.5}], ids=["greedy", "penalties"]
)
def test_a_solo_request_joins_the_batch_without_losing_or_repeating_a_token(
    h: BatcherHarness, steps_alone: int, params: dict[str, float]
) -> None:
    h.submit("alone", max_tokens=30, prompt="the quick brown fox", **params)
    h.run()
    h.submit("joined", max_tokens=30, prompt="the quick brown fox", **params)
    join_after(h, steps_alone)
    joined = check_well_formed(h, "joined")
    assert joined.completion_tokens == 30 and joined.finish_reason == "length"
    assert h.text("joined") == h.text("alone")
    check_well_formed(h, "newcomer")


@pytest.mark.parametrize("steps_alone", [1, 3, 6, 10])
@pytest.mark.parametrize("params", [{}, {"temperature": 0.3, "seed": 5}], ids=["greedy", "seeded"])
def test_a_speculating_solo_request_gives_the_text_of_one_token_a_pass_and_joins_the_batch_mid_draft(
    h: BatcherHarness, steps_alone: int, params: dict[str, Any]
) -> None:
    h.batcher.max_draft_tokens = 0
    h.submit("plain", max_tokens=40, prompt="the quick brown fox", **params)
    h.run()
    h.batcher.max_draft_tokens = 8  # as on a GPU or an OpenBLAS CPU (this process has MLX's reference BLAS)
    h.submit("alone", max_tokens=40, prompt="the quick brown fox", prediction=h.text("plain"), **params)
    h.run()
    assert h.text("alone") == h.text("plain")
    alone = check_well_formed(h, "alone")
    assert 20 <= alone.accepted_draft_tokens <= alone.completion_tokens - 1
    assert alone.draft_tokens >= alone.accepted_draft_tokens

    h.submit("joined", max_tokens=40, prompt="the quick brown fox", prediction=h.text("plain"), **params)
    join_after(h, steps_alone)
    joined = check_well_formed(h, "joined")
    assert joined.completion_tokens == 40 and h.text("joined") == h.text("plain")
    # drafting ends with solo; the first step is the prefill's token, drafted from nothing (the seeded run's
    # first drafts miss: its mid-draft leaving is pinned in test_solo.py)
    assert joined.accepted_draft_tokens < alone.accepted_draft_tokens
    if not params:
        assert (joined.accepted_draft_tokens > 0) is (steps_alone > 1)


def test_caches_that_cannot_drop_any_number_of_tokens_never_draft(h: BatcherHarness) -> None:
    h.batcher.max_draft_tokens = 8
    plan, choice = SimpleNamespace(prediction=[]), SimpleNamespace(processors=[])
    plain = [KVCache(), KVCache()]
    assert h.batcher._draft_lookup([1, 2, 3], plan, choice, plain) is not None  # type: ignore[arg-type]
    # a sliding window stops trimming once it wraps
    rotating = [KVCache(), RotatingKVCache(max_size=128)]
    assert h.batcher._draft_lookup([1, 2, 3], plan, choice, rotating) is None  # type: ignore[arg-type]


def test_requests_with_logits_processors_never_draft(h: BatcherHarness) -> None:
    h.batcher.max_draft_tokens = 8
    h.submit("plain", max_tokens=30, prompt="the quick brown fox")
    h.run()
    h.submit("penalized", max_tokens=30, prompt="the quick brown fox", prediction=h.text("plain"),
             presence_penalty=0.5)
    h.run()
    assert check_well_formed(h, "penalized").draft_tokens == 0
    assert check_well_formed(h, "plain").draft_tokens > 0


def test_a_solo_request_ended_by_its_last_token_at_the_join_does_not_enter_the_batch(h: BatcherHarness) -> None:
    h.submit("short", max_tokens=2, prompt="the quick brown fox")
    h.batcher.step()  # the first token; the second (its last) is in flight
    h.submit("next", max_tokens=3)
    h.batcher.step()
    assert check_well_formed(h, "short").completion_tokens == 2
    h.run()
    check_well_formed(h, "next")


def test_a_request_that_joined_from_solo_leaves_its_cache_for_the_next_turn(h: BatcherHarness) -> None:
    h.submit("t1", max_tokens=8)
    h.batcher.step()
    h.submit("other", max_tokens=3, prompt="unrelated words")
    h.run()
    turn2 = (*HELLO, ChatMessage("assistant", h.text("t1")), ChatMessage("user", "tell me more"))
    h.submit("t2", messages=turn2, max_tokens=4)
    h.run()
    assert h.started("t2").cached_tokens >= h.started("t1").prompt_tokens


def test_context_length_exceeded(h: BatcherHarness) -> None:
    h.submit("p", prompt="hello " * 600)
    h.submit("m", messages=(ChatMessage("user", "world " * 600),))
    h.run()
    p, m = h.of("p"), h.of("m")
    assert len(p) == 1 and isinstance(p[0], Failed)
    assert (p[0].code, p[0].param) == ("context_length_exceeded", "prompt")
    assert "512" in p[0].message
    assert isinstance(m[0], Failed) and (m[0].code, m[0].param) == ("context_length_exceeded", "messages")
    h.submit("edge", prompt="hello " * 511)  # BOS + 511 = 512 tokens: no room left
    h.run()
    assert isinstance(h.end("edge"), Failed)


def test_max_tokens_is_clamped_to_the_context(h: BatcherHarness) -> None:
    h.submit("a", prompt="hello " * 505, max_tokens=100)  # 506 prompt tokens, 6 left
    h.run()
    end = check_well_formed(h, "a")
    assert end.prompt_tokens == 506
    assert end.completion_tokens <= 6


def test_same_seed_same_text(h: BatcherHarness) -> None:
    for rid in ("s1", "s2"):
        h.submit(rid, max_tokens=20, temperature=1.0, seed=1234)
        h.run()
    h.submit("other", max_tokens=20, temperature=1.0, seed=99)
    h.run()
    assert h.text("s1") == h.text("s2")
    assert h.text("s1") != h.text("other")


def test_penalties_change_greedy_output(h: BatcherHarness) -> None:
    h.submit("plain", max_tokens=30)
    h.submit("penalised", max_tokens=30, presence_penalty=100.0)
    h.run()
    plain, penalised = h.text("plain").split(), h.text("penalised").split()
    assert len(set(plain)) < len(plain)  # this random model repeats itself when greedy
    assert len(set(penalised)) == len(penalised)


def test_second_turn_reuses_the_prefix_cache(h: BatcherHarness) -> None:
    h.submit("t1", max_tokens=8)
    h.run()
    first = h.started("t1")
    assert first.cached_tokens == 0
    reply = h.text("t1")
    turn2 = (*HELLO, ChatMessage("assistant", reply), ChatMessage("user", "tell me more"))
    h.submit("t2", messages=turn2, max_tokens=4)
    h.run()
    second = h.started("t2")
    assert second.cached_tokens >= first.prompt_tokens
    assert check_well_formed(h, "t2").cached_tokens == second.cached_tokens
    assert h.batcher.heartbeat().prompt_cache_bytes > 0


def test_exact_repeat_of_a_cached_prompt(h: BatcherHarness) -> None:
    h.submit("a", prompt="hello world", max_tokens=3)
    h.run()
    tokens_so_far = "hello world " + h.text("a")
    h.submit("b", prompt=tokens_so_far, max_tokens=3)
    h.run()
    check_well_formed(h, "b")
    assert h.started("b").cached_tokens == h.started("b").prompt_tokens - 1


def test_chat_template_that_rejects_messages_is_invalid_request(h: BatcherHarness) -> None:
    h.submit("a", messages=(ChatMessage("robot", "beep"),))
    h.run()
    (failed,) = h.of("a")
    assert isinstance(failed, Failed)
    assert (failed.code, failed.param) == ("invalid_request", "messages")
    assert "unknown role" in failed.message


def test_model_without_chat_template_gets_a_plain_transcript(h: BatcherHarness) -> None:
    h.submit("a", model="plain", max_tokens=4)
    h.run()
    assert check_well_formed(h, "a").prompt_tokens > 3


def test_model_failures_are_per_request(h: BatcherHarness) -> None:
    h.submit("missing", model="nope")
    h.submit("broken", model="broken")
    h.submit("broken-again", model="broken")
    h.submit("fine", max_tokens=3)
    h.run()
    assert isinstance(h.end("missing"), Failed) and h.end("missing").code == "model_not_found"  # type: ignore[union-attr]
    for rid in ("broken", "broken-again"):
        end = h.end(rid)
        assert isinstance(end, Failed) and end.code == "model_load_failed"
        assert "'broken'" in end.message
    check_well_formed(h, "fine")
    failed = h.batcher.heartbeat().failed
    assert [f.id for f in failed] == ["broken"]


def test_a_load_or_a_load_failure_sends_a_heartbeat_before_the_answer(h: BatcherHarness) -> None:
    h.submit("a", max_tokens=2)
    h.submit("b", model="broken")
    h.run()
    # (the batcher now sends residency's ModelEvents on the same stream, as the engine always did)
    kinds = [type(e).__name__ for e in h.events
             if getattr(e, "request_id", "a") == "a" and not isinstance(e, ModelEvent)]
    assert kinds[:3] == ["Loading", "Heartbeat", "Started"]  # the request hears its model is loading first
    beat = next(e for e in h.events if isinstance(e, Heartbeat))
    assert [m.id for m in beat.loaded] == ["tiny"]
    failure = h.of("b")[0]
    before = h.events[h.events.index(failure) - 1]
    assert isinstance(before, Heartbeat) and [f.id for f in before.failed] == ["broken"]


def test_raise_fault_ends_only_its_request(models_dir: Path) -> None:
    h = BatcherHarness(models_dir, allow_fault_injection=True)
    h.submit("ok", max_tokens=10)
    h.submit("bad", max_tokens=10, fault="raise")
    h.run()
    bad = h.end("bad")
    assert isinstance(bad, Failed) and bad.code == "internal_error"
    assert check_well_formed(h, "ok").completion_tokens == 10
    h.submit("after", max_tokens=3)
    h.run()
    check_well_formed(h, "after")
    h.batcher.shutdown()


def test_slow_fault_paces_the_steps(models_dir: Path) -> None:
    h = BatcherHarness(models_dir, allow_fault_injection=True)
    h.submit("warm", max_tokens=2)
    h.run()
    h.submit("slow", max_tokens=6, fault="slow")
    started = time.monotonic()
    h.run()
    assert time.monotonic() - started >= 0.25  # ~20 tokens/s
    check_well_formed(h, "slow")
    h.batcher.shutdown()


def test_faults_are_ignored_unless_allowed(h: BatcherHarness) -> None:
    h.submit("a", max_tokens=3, fault="raise")
    h.run()
    check_well_formed(h, "a")


def test_a_failing_generator_step_ends_its_requests_and_recovers(
    h: BatcherHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.submit("a", max_tokens=50)
    h.submit("a2", max_tokens=50)  # two at once: the batch, not solo
    h.batcher.step()
    state = h.batcher._states["tiny"]

    def boom() -> None:
        raise RuntimeError("native failure")

    monkeypatch.setattr(state.generator, "next", boom)
    h.batcher.step()
    for rid in ("a", "a2"):
        end = h.end(rid)
        assert isinstance(end, Failed) and end.code == "internal_error" and "native failure" in end.message
    h.submit("b", max_tokens=3)
    h.run()
    check_well_formed(h, "b")


def test_a_failing_solo_step_ends_its_request_and_recovers(h: BatcherHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    h.submit("a", max_tokens=50)
    h.batcher.step()
    solo = h.batcher._states["tiny"].solo_row
    assert solo is not None and solo.solo is not None

    def boom(more: bool) -> int:
        raise RuntimeError("native failure")

    monkeypatch.setattr(solo.solo, "next_token", boom)
    h.batcher.step()
    end = h.end("a")
    assert isinstance(end, Failed) and end.code == "internal_error" and "native failure" in end.message
    assert h.batcher.running == 0
    h.submit("b", max_tokens=3)
    h.run()
    check_well_formed(h, "b")


def test_shutdown_aborts_everything_and_frees_models(models_dir: Path) -> None:
    h = BatcherHarness(models_dir, max_running=1)
    h.submit("a", max_tokens=100)
    h.submit("b", max_tokens=100)
    h.batcher.step()
    h.batcher.shutdown()
    assert isinstance(h.end("a"), Finished) and h.end("a").finish_reason == "abort"  # type: ignore[union-attr]
    assert h.of("b") == [Finished("b", "abort", 0, 0, 0)]
    beat = h.batcher.heartbeat()
    assert (beat.running, beat.waiting, beat.loaded) == (0, 0, ())


# -- tool calls, structured output, logprobs, n: through the batch and the solo path -------------------------

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    # Bounded values: a random model decoding greedily can loop inside an unbounded string or number.
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
                   "required": ["city", "days"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models dressed as Qwen2.5 and Llama 3.1 (their real chat templates and special tokens)."""
    root = tmp_path_factory.mktemp("families")
    tm.make_tiny_model(root / "qwen", chat_format="qwen2.5", context_length=4096)
    tm.make_tiny_model(root / "llama", chat_format="llama3.1", context_length=4096)
    tm.make_tiny_model(root / "json", tokenizer="bpe", context_length=4096)
    return root


def submit_command(h: BatcherHarness, rid: str, model: str, **fields: object) -> None:
    params = SamplingParams(**fields.pop("params", {"max_tokens": 200, "temperature": 0.0}))  # type: ignore[arg-type]
    messages = fields.pop("messages", (ChatMessage("user", "What is the weather in Paris?"),))
    h.batcher.submit(Generate(rid, model, params, messages=messages, **fields))  # type: ignore[arg-type]


def calls_of(h: BatcherHarness, rid: str) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for event in h.of(rid):
        if isinstance(event, Delta):
            for piece in event.tool_calls:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                call["name"] = piece.name or call["name"]
                call["arguments"] += piece.arguments
    return calls


@pytest.mark.parametrize("model", ["qwen", "llama"])
@pytest.mark.parametrize("alone", [True, False], ids=["solo", "batch"])
def test_a_required_tool_call_is_forced_and_comes_back_as_a_call_with_valid_arguments(
    family_dir: Path, model: str, alone: bool
) -> None:
    h = BatcherHarness(family_dir)
    if not alone:
        submit_command(h, "other", model, params={"max_tokens": 40, "temperature": 0.0})
    submit_command(h, "call", model, tools=specs(WEATHER), tool_choice="required")
    h.run()
    end = h.end("call")
    assert isinstance(end, Finished) and end.finish_reason == "tool_calls"
    assert h.text("call") == ""  # markup never reaches the content
    (call,) = calls_of(h, "call").values()
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    arguments = json.loads(call["arguments"])
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
    assert set(arguments) == {"city", "days"}


def test_a_json_schema_constraint_gives_output_that_validates(family_dir: Path) -> None:
    from mlx_backend.contract import Constraint

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
              "required": ["name", "tags"], "additionalProperties": False}
    h = BatcherHarness(family_dir)
    for i, seed in enumerate([1, 2, 3]):
        submit_command(h, f"json{i}", "json", params={"max_tokens": 300, "temperature": 1.0, "seed": seed},
                       constraint=Constraint("json_schema", json.dumps(schema), strict=True))
    h.run()
    for i in range(3):
        end = h.end(f"json{i}")
        assert isinstance(end, Finished) and end.finish_reason == "stop", h.text(f"json{i}")
        value = json.loads(h.text(f"json{i}"))
        assert set(value) == {"name", "tags"} and set(value["tags"]) <= {"a", "b"}


def test_a_grammar_that_does_not_compile_is_an_invalid_request_naming_the_parameter(family_dir: Path) -> None:
    from mlx_backend.contract import Constraint

    h = BatcherHarness(family_dir)
    submit_command(h, "bad", "json", constraint=Constraint("lark", "start: <|no_such_special_token|>"))
    h.run()
    failed = h.end("bad")
    assert isinstance(failed, Failed) and failed.code == "invalid_request" and failed.param == "response_format"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_come_one_per_generated_token_with_the_asked_number_of_rivals(
    h: BatcherHarness, temperature: float
) -> None:
    h.submit("lp", max_tokens=10, temperature=temperature, seed=3, logprobs=4)
    h.run()
    deltas = [e for e in h.of("lp") if isinstance(e, Delta)]
    entries = [entry for d in deltas for entry in d.logprobs]
    end = h.end("lp")
    assert isinstance(end, Finished)
    assert len(entries) == end.completion_tokens - (end.finish_reason == "stop")  # EOS is not listed
    for entry in entries:
        assert len(entry.top) == 4 and entry.logprob <= 0
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        if temperature == 0.0:  # greedy picks the most likely token
            assert entry.token_bytes == entry.top[0].token_bytes and entry.logprob == entry.top[0].logprob
    assert "".join(e.token_bytes.decode(errors="replace") for e in entries).strip() != ""


def test_n_choices_share_one_prefill_and_each_finish_with_its_index(h: BatcherHarness) -> None:
    h.batcher.submit(Generate("n3", "tiny", SamplingParams(max_tokens=8, temperature=1.0, seed=7),
                              messages=HELLO, n=3))
    h.run()
    events = h.of("n3")
    assert [type(e).__name__ for e in events].count("Started") == 1
    ends = [e for e in events if isinstance(e, Finished)]
    assert sorted(e.index for e in ends) == [0, 1, 2]
    texts = ["".join(e.text for e in events if isinstance(e, Delta) and e.index == i) for i in range(3)]
    assert len(set(texts)) > 1  # seed, seed + 1, seed + 2: different draws
    # Choice 0 of a seeded request is the request with that seed alone.
    h.submit("alone", max_tokens=8, temperature=1.0, seed=7)
    h.run()
    assert h.text("alone") == texts[0]


def test_greedy_choices_are_identical_and_abort_ends_all_of_them(h: BatcherHarness) -> None:
    h.batcher.submit(Generate("g", "tiny", SamplingParams(max_tokens=6, temperature=0.0), messages=HELLO, n=2))
    h.run()
    texts = {"".join(e.text for e in h.of("g") if isinstance(e, Delta) and e.index == i) for i in range(2)}
    assert len(texts) == 1
    h.batcher.submit(Generate("long", "tiny", SamplingParams(max_tokens=200, temperature=0.0), messages=HELLO, n=3))
    h.batcher.step()
    h.batcher.step()
    h.batcher.abort("long")
    assert h.batcher.running == 0 and not h.batcher.has_work()
    assert isinstance(h.end("long"), Finished) and h.end("long").finish_reason == "abort"  # type: ignore[union-attr]


def test_n_beyond_the_batch_is_refused_by_name(h: BatcherHarness) -> None:
    h.batcher.submit(Generate("big", "tiny", SamplingParams(max_tokens=2), messages=HELLO, n=10_000))
    failed = h.end("big")
    assert isinstance(failed, Failed) and failed.param == "n"


def test_constrained_rows_in_a_batch_get_their_masks_in_one_step_computation(
    family_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch step plans every constrained row's mask together (computed at once, beside the forward
    pass, mlx_backend/masks.py): several constrained rows and a plain one decode correctly side by side. This
    reads mlx-lm's GenerationBatch internals; if they move, this fails."""
    from mlx_backend.engine.masks import MaskStep

    rows_per_step: list[int] = []
    original = MaskStep._compute
    monkeypatch.setattr(MaskStep, "_compute",
                        lambda self, logits: (rows_per_step.append(len(self._rows)), original(self, logits))[1])
    h = BatcherHarness(family_dir)
    submit_command(h, "plain", "qwen", params={"max_tokens": 30, "temperature": 0.0})
    for i in range(3):
        submit_command(h, f"call{i}", "qwen", tools=specs(WEATHER), tool_choice="required",
                       parallel_tool_calls=False, params={"max_tokens": 200, "temperature": 1.0, "seed": i})
    h.run()
    assert max(rows_per_step) == 3  # the three constrained rows' masks in one computation
    for i in range(3):
        end = h.end(f"call{i}")
        assert isinstance(end, Finished) and end.finish_reason == "tool_calls"
        (call,) = calls_of(h, f"call{i}").values()
        assert set(json.loads(call["arguments"])) == {"city", "days"}
    alone = BatcherHarness(family_dir)
    submit_command(alone, "plain", "qwen", params={"max_tokens": 30, "temperature": 0.0})
    alone.run()
    assert h.text("plain") == alone.text("plain")  # constrained neighbours change nothing for it


# -- agents sharing a system prompt ---------------------------------------------------------------------------

AGENT_RULES = ChatMessage("system", " ".join(["hello", "world", "python", "code"] * 200))  # 800 tokens


def agent(i: int) -> tuple[ChatMessage, ...]:
    return AGENT_RULES, ChatMessage("user", " ".join(["the", "water", "tree", "book"][i:] * 3))


def test_requests_arriving_together_with_one_long_system_prompt_prefill_it_once(models_dir: Path) -> None:
    h = BatcherHarness(models_dir, max_running=4, prefill_gather_steps=0)
    for i in range(3):
        h.submit(f"agent{i}", model="long", messages=agent(i), max_tokens=6)
    h.run()
    starts = [h.started(f"agent{i}") for i in range(3)]
    assert starts[0].cached_tokens == 0  # the first paid for the shared part: it found nothing cached
    assert all(s.cached_tokens >= 800 for s in starts[1:])  # the others start after the system prompt
    texts = [h.text(f"agent{i}") for i in range(3)]
    h.batcher.shutdown()
    for i in range(3):  # the same tokens as each request alone, with nothing cached
        alone = BatcherHarness(models_dir, max_running=4, prefill_gather_steps=0)
        alone.submit("a", model="long", messages=agent(i), max_tokens=6)
        alone.run()
        assert alone.text("a") == texts[i]
        alone.batcher.shutdown()


def test_requests_arriving_during_a_long_solo_prefill_start_from_its_prompt(models_dir: Path) -> None:
    h = BatcherHarness(models_dir, max_running=4, prefill_gather_steps=0)
    h.submit("first", model="long", messages=agent(0), max_tokens=6)
    h.batcher.step()  # alone: its whole prompt is prefilled in this step, before the next one is read
    h.submit("second", model="long", messages=agent(1), max_tokens=6)
    h.run()
    assert h.started("second").cached_tokens >= 800
    h.batcher.shutdown()
