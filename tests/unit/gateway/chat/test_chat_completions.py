"""POST /v1/chat/completions through the real app and the scripted engine."""

from __future__ import annotations

import json
from typing import Any

import pytest
from litestar.testing import TestClient

from mlx_backend.client.fake import FakeEngine
from mlx_backend.contract import ReasoningControl
from tests.unit.gateway.conftest import ClientFactory, chat_body, sse_payloads


def test_non_streaming_reply_has_openai_shape_and_consistent_usage(client: TestClient[Any]) -> None:
    response = client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("Hello from the scripted engine")
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert response.headers["x-request-id"] in body["id"]


def test_stream_follows_openai_chunk_invariants(client: TestClient[Any]) -> None:
    response = client.post(
        "/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True})
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks, usage_chunk = payloads[:-2], payloads[-2]
    assert {c["id"] for c in chunks} | {usage_chunk["id"]} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in [*chunks, usage_chunk])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finish_reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finish_reasons == ["stop"]
    assert usage_chunk["choices"] == []
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert usage_chunk["usage"]["completion_tokens"] == len(text.split())


def test_stream_without_include_usage_sends_no_usage_chunk(client: TestClient[Any]) -> None:
    payloads = sse_payloads(client.post("/v1/chat/completions", json=chat_body(stream=True)).text)
    assert payloads[-1] == "[DONE]"
    assert all(p["choices"] for p in payloads[:-1])


def test_stop_string_ends_the_reply_and_is_never_emitted(client: TestClient[Any]) -> None:
    body = client.post("/v1/chat/completions", json=chat_body(stop=["engine"])).json()
    assert "engine" not in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_under_either_name_limits_the_reply(client: TestClient[Any], field: str) -> None:
    body = client.post("/v1/chat/completions", json=chat_body(**{field: 2})).json()
    assert body["usage"]["completion_tokens"] == 2
    assert body["choices"][0]["finish_reason"] == "length"


def test_sampling_parameters_reach_the_engine(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    client.post("/v1/chat/completions", json=chat_body(
        temperature=0.5, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=-0.5, stop="x", user="u1",
    ))
    params = engine.received[-1].params
    assert (params.temperature, params.top_p, params.seed) == (0.5, 0.9, 7)
    assert (params.presence_penalty, params.frequency_penalty, params.stop) == (0.5, -0.5, ("x",))
    assert engine.received[-1].fault is None  # 'user' is never a fault outside test mode


def test_logit_bias_reaches_the_engine_as_sorted_token_ids_without_zero_amounts(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    client.post("/v1/chat/completions", json=chat_body(logit_bias={"50": 2.5, "7": -100, "9": 0}))
    client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "logit_bias": {"3": 100}})
    assert engine.received[0].params.logit_bias == ((7, -100.0), (50, 2.5))
    assert engine.received[1].params.logit_bias == ((3, 100.0),)


def test_content_parts_and_every_role_are_accepted(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    assert client.post("/v1/chat/completions", json=chat_body(messages=messages)).status_code == 200
    sent = engine.received[-1].messages
    assert sent is not None
    assert [m.role for m in sent] == ["system", "system", "user", "assistant", "tool"]
    assert sent[2].content == "ab"


def test_legacy_completion_non_streaming_and_streaming(client: TestClient[Any]) -> None:
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once", "max_tokens": 3}).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello from the"
    assert body["choices"][0]["finish_reason"] == "length"
    payloads = sse_payloads(client.post("/v1/completions", json={
        "model": "tiny", "prompt": ["Once"], "stream": True, "stream_options": {"include_usage": True},
    }).text)
    assert payloads[-1] == "[DONE]"
    assert all(p["object"] == "text_completion" for p in payloads[:-1])
    assert payloads[-2]["choices"] == [] and payloads[-2]["usage"]["prompt_tokens"] == 1


def test_legacy_completion_defaults_to_openais_16_tokens(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    make_client(engine).post("/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert engine.received[-1].params.max_tokens == 16


# -- reasoning controls -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("effort", "control"), [
    ("none", ReasoningControl(enabled=False)),
    ("minimal", ReasoningControl(enabled=True, effort="low")),
    ("medium", ReasoningControl(enabled=True, effort="medium")),
    ("xhigh", ReasoningControl(enabled=True, effort="high")),
])
def test_reasoning_effort_reaches_the_engine_as_a_control(make_client: ClientFactory, effort: str,
                                                          control: ReasoningControl) -> None:
    engine = FakeEngine()
    response = make_client(engine).post("/v1/chat/completions", json=chat_body(reasoning_effort=effort))
    assert response.status_code == 200, response.text
    assert engine.received[-1].reasoning == control


def test_chat_template_kwargs_reach_the_template_and_switch_thinking(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    client = make_client(engine)
    kwargs = {"enable_thinking": False, "custom": [1, 2]}
    assert client.post("/v1/chat/completions", json=chat_body(chat_template_kwargs=kwargs)).status_code == 200
    assert json.loads(engine.received[-1].template_kwargs or "") == kwargs
    assert engine.received[-1].reasoning == ReasoningControl(enabled=False)
    both = chat_body(chat_template_kwargs={"enable_thinking": False}, reasoning_effort="high")
    assert client.post("/v1/chat/completions", json=both).status_code == 200
    assert engine.received[-1].reasoning == ReasoningControl(enabled=True, effort="high")  # the API field wins


@pytest.mark.parametrize(("overrides", "param"), [
    ({"reasoning_effort": "maximal"}, "reasoning_effort"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt"),
])
def test_a_reasoning_control_that_makes_no_sense_is_a_400_naming_it(client: TestClient[Any],
                                                                    overrides: dict[str, Any], param: str) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(**overrides))
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_an_assistant_turn_carrying_its_reasoning_is_accepted_and_passed_on(make_client: ClientFactory) -> None:
    engine = FakeEngine()
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "reasoning_content": "I thought."},
                {"role": "assistant", "content": "b", "reasoning": "Newer name."},
                {"role": "user", "content": "go on"}]
    response = make_client(engine).post("/v1/chat/completions", json=chat_body(messages=messages))
    assert response.status_code == 200, response.text
    sent = engine.received[-1].messages or ()
    assert [m.reasoning for m in sent] == [None, "I thought.", "Newer name.", None]
