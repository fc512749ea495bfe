"""The in-memory store behind previous_response_id: turns chained by id, bounded in bytes, LRU."""

from __future__ import annotations

from gateway.responses.store import ResponseStore
from gateway.responses.wire import ResponseObject
from mlx_backend.contract import ChatMessage


def response(rid: str, previous: str | None = None) -> ResponseObject:
    return ResponseObject(id=rid, created_at=0, status="completed", instructions=None, max_output_tokens=None,
                          model="m", output=[], parallel_tool_calls=True, previous_response_id=previous, store=True,
                          temperature=1.0, text={}, tool_choice="auto", tools=[], top_p=1.0)


def turn(question: str, answer: str = "ok") -> tuple[ChatMessage, ...]:
    return ChatMessage("user", question), ChatMessage("assistant", answer)


def test_a_chain_of_responses_is_one_conversation_oldest_first() -> None:
    store = ResponseStore(1 << 20)
    store.put(response("a"), turn("one"))
    store.put(response("b", "a"), turn("two"))
    store.put(response("c", "b"), turn("three"))
    assert [m.content for m in store.conversation("c") or ()] == ["one", "ok", "two", "ok", "three", "ok"]
    assert [m.content for m in store.conversation("a") or ()] == ["one", "ok"]
    assert store.conversation("zzz") is None


def test_the_store_stays_within_its_bytes_forgetting_the_least_recently_used() -> None:
    store = ResponseStore(3000)
    for name in "abcdefgh":
        store.put(response(name), turn(name * 200))
    assert store.bytes <= 3000 and 0 < len(store) < 8
    assert store.get("h") is not None and store.get("a") is None


def test_using_a_conversation_keeps_it() -> None:
    store = ResponseStore(3000)
    store.put(response("old"), turn("x" * 200))
    store.put(response("keep", "old"), turn("y" * 200))
    for name in "abcdefgh":
        assert store.conversation("keep") is not None  # touches "keep" and "old"
        store.put(response(name), turn(name * 200))
    assert store.conversation("keep") is not None


def test_a_forgotten_link_breaks_the_chain_rather_than_shortening_it() -> None:
    store = ResponseStore(1 << 20)
    store.put(response("a"), turn("one"))
    store.put(response("b", "a"), turn("two"))
    assert store.delete("a") and not store.delete("a")
    assert store.conversation("b") is None


def test_a_response_larger_than_the_store_is_not_kept_and_size_zero_keeps_nothing() -> None:
    assert not ResponseStore(100).put(response("a"), turn("x" * 1000))
    off = ResponseStore(0)
    assert not off.enabled and not off.put(response("a"), turn("x"))
