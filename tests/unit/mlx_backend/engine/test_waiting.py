"""The queue of requests accepted but not started: arrival order, and what is remembered of each until it
leaves (the step it came at, the Loading notice, a plan kept while it waits for memory)."""

from __future__ import annotations

from typing import Any

from mlx_backend.contract import Generate, SamplingParams
from mlx_backend.engine.waiting import WaitingRequests


def command(rid: str, model: str = "m", n: int = 1) -> Generate:
    return Generate(rid, model, SamplingParams(max_tokens=1), prompt="x", n=n)


def test_requests_come_out_in_arrival_order_and_may_be_removed_while_iterating() -> None:
    waiting = WaitingRequests()
    for rid in "abc":
        waiting.add(command(rid), step=0)
    for c in waiting:
        if c.request_id == "b":
            waiting.remove(c)
    assert [c.request_id for c in waiting] == ["a", "c"] and len(waiting) == 2
    assert waiting.holds("a") and not waiting.holds("b") and waiting.find("b") is None


def test_a_loading_notice_is_news_once_and_again_after_the_request_left_and_came_back() -> None:
    waiting = WaitingRequests()
    a = command("a")
    waiting.add(a, step=0)
    assert waiting.first_time_loading("a") and not waiting.first_time_loading("a")
    waiting.remove(a)
    waiting.add(a, step=5)
    assert waiting.first_time_loading("a")


def test_a_kept_plan_belongs_to_its_request_and_goes_with_it() -> None:
    waiting = WaitingRequests()
    a, b = command("a"), command("b")
    waiting.add(a, step=0)
    waiting.add(b, step=0)
    plan: Any = object()
    waiting.keep_plan("a", plan)
    assert waiting.plan_of("a") is plan and waiting.plan_of("b") is None
    waiting.remove(a)
    assert waiting.plan_of("a") is None


def test_others_for_a_model_do_not_count_the_one_starting() -> None:
    waiting = WaitingRequests()
    a, b = command("a", "m"), command("b", "other")
    waiting.add(a, step=0)
    waiting.add(b, step=0)
    assert not waiting.others_for("m", a) and waiting.others_for("other", a)


def test_the_oldest_arrival_gathers_company_through_the_given_steps_or_until_enough_are_here() -> None:
    waiting = WaitingRequests()
    assert not waiting.gathering(step=10, gather_steps=4, company=8)  # nobody waits
    waiting.add(command("a"), step=10)  # arrived after step 10
    assert not waiting.gathering(step=11, gather_steps=0, company=8)  # off
    assert waiting.gathering(step=14, gather_steps=4, company=8)  # steps 11 to 14: four steps of waiting
    assert not waiting.gathering(step=15, gather_steps=4, company=8)
    assert not waiting.gathering(step=11, gather_steps=4, company=1)  # one free slot: nobody else could join
    for i in range(8 - 1):
        waiting.add(command(f"r{i}"), step=11)
    assert not waiting.gathering(step=12, gather_steps=4, company=8)


def test_company_counts_rows_a_request_with_n_choices_brings_n() -> None:
    waiting = WaitingRequests()
    waiting.add(command("a", n=3), step=10)
    assert waiting.gathering(step=11, gather_steps=4, company=4)  # 3 rows of 4
    waiting.add(command("b"), step=11)
    assert not waiting.gathering(step=11, gather_steps=4, company=4)


def test_take_all_empties_the_queue_and_its_memory() -> None:
    waiting = WaitingRequests()
    waiting.add(command("a"), step=0)
    waiting.keep_plan("a", object())  # type: ignore[arg-type]
    assert [c.request_id for c in waiting.take_all()] == ["a"]
    assert len(waiting) == 0 and not waiting.holds("a") and waiting.plan_of("a") is None
