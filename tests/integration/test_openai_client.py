"""The official `openai` client against a real server and a real engine: the contract users rely on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support import tiny_models as tm
from tests.support.server import ServerProcess
from tests.support.tiny_models import NEVER_STOP


@pytest.fixture(scope="module")
def client(shared_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=shared_server.base_url + "/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        yield c


MESSAGES: list[Any] = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12)
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.completion_tokens <= 12 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_streaming_with_usage_keeps_every_invariant(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 16
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_stream_and_non_stream_give_the_same_greedy_text(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16,
                                           temperature=0).choices[0].message.content
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole


def test_same_seed_same_output(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        return client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=20, temperature=1.0, seed=seed,
        ).choices[0].message.content

    assert sample(123) == sample(123)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1  # the seed does change the sample


def test_stop_string_is_matched_on_text_and_never_emitted(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30,
                                          temperature=0).choices[0].message.content or ""
    assert len(free) > 4
    stop = free[2:4]  # a stop string taken from the middle of real output, likely spanning tokens
    stopped = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30,
                                             temperature=0, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == free[: free.index(stop)]


def test_logit_bias_steers_the_model_token_by_token(client: openai.OpenAI) -> None:
    def greedy(**extra: Any) -> Any:
        return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                              temperature=0, logprobs=True, **extra).choices[0]

    first = greedy().logprobs.content[0].token
    banned = greedy(logit_bias={str(_token_id(first)): -100})
    assert banned.logprobs.content[0].token != first
    hello = str(_token_id("hello"))
    forced = greedy(logit_bias={hello: 100})
    assert [t.token for t in forced.logprobs.content] == ["hello"] * 6
    streamed: Any = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                                   temperature=0, logit_bias={hello: 100}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == forced.message.content
    legacy = client.completions.create(model="tiny", prompt="The answer is", max_tokens=3, temperature=0,
                                       logit_bias={hello: 100})
    assert legacy.choices[0].text.split() == ["hello"] * 3


def test_logit_bias_against_the_stop_tokens_runs_a_sampled_reply_to_max_tokens(client: openai.OpenAI) -> None:
    for seed in range(8):
        reply: Any = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                    max_tokens=40, temperature=1.5, seed=seed, logit_bias=NEVER_STOP)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 40


def test_a_logit_bias_naming_a_token_the_model_lacks_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=MESSAGES, logit_bias={"512": 1})
    assert bad.value.param == "logit_bias" and "512" in bad.value.message


def _token_id(word: str) -> int:
    """The tiny model's word-level vocabulary lists its words in a fixed order (tests/support/tiny_models)."""
    return tm._vocabulary(512).index(word)


def test_legacy_completions_stream_and_not(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="tiny", prompt="The answer is", max_tokens=5)
    assert completion.object == "text_completion" and completion.usage is not None
    assert completion.usage.completion_tokens <= 5
    chunks = list(client.completions.create(model="tiny", prompt="The answer is", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"tiny", "org/tiny-two"} <= ids
    model = client.models.retrieve("org/tiny-two")
    assert model.id == "org/tiny-two" and model.owned_by == "org"
    assert (model.model_extra or {}).get("context_length") == 512


def test_errors_map_to_the_sdks_exception_classes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="missing", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=1000)
    assert bad.value.param == "n"  # 1 to 128, as OpenAI allows
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "word " * 400}], max_tokens=5)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("../tiny")


def test_raw_malformed_input_gets_400_and_the_server_keeps_serving(shared_server: ServerProcess) -> None:
    url = shared_server.base_url + "/v1/chat/completions"
    bad_bodies = [b"{", b"\xff\xfe\xfa", b'{"model": "tiny", "messages": "hi"}', b'{"model": "tiny"}', b"[]",
                  b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e309}']
    for body in bad_bodies:
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=10)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(url, content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"},
                      timeout=30).status_code == 413
    assert shared_server.health().status_code == 200


def test_a_prediction_of_the_reply_is_drafted_from_and_changes_only_the_counts(
    client: openai.OpenAI, shared_server: ServerProcess
) -> None:
    # A lone request decodes speculatively (this server's engine multiplies with OpenBLAS, tests/run.sh
    # installs it); OpenAI's Predicted Outputs feed it the reply to expect.
    asked: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 48, "temperature": 0}
    plain = client.chat.completions.create(**asked)
    assert plain.usage is not None and plain.usage.completion_tokens_details is None  # no prediction: no counts
    text = plain.choices[0].message.content
    assert text

    predicted = client.chat.completions.create(**asked, prediction={"type": "content", "content": text})
    assert predicted.choices[0].message.content == text
    assert predicted.usage is not None and predicted.usage.completion_tokens_details is not None
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens is not None and details.rejected_prediction_tokens is not None
    # drafts the reply kept: at most every token but the first (the prefill's)
    assert predicted.usage.completion_tokens // 2 <= details.accepted_prediction_tokens
    assert details.accepted_prediction_tokens <= predicted.usage.completion_tokens - 1, details

    stream = client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True},
                                            prediction={"type": "content", "content": [{"type": "text",
                                                                                        "text": text}]})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    last = chunks[-1].usage
    assert last is not None and last.completion_tokens_details is not None
    assert last.completion_tokens_details.accepted_prediction_tokens == details.accepted_prediction_tokens

    metrics = httpx.get(shared_server.base_url + "/metrics", timeout=10).text
    accepted = [line for line in metrics.splitlines()
                if line.startswith('mlx_gateway_draft_tokens_total{model="tiny",outcome="accepted"}')]
    assert accepted and float(accepted[0].split()[-1]) >= 2 * details.accepted_prediction_tokens


def test_a_prediction_of_another_kind_is_a_400_naming_it(client: openai.OpenAI) -> None:
    for prediction in ({"type": "image", "content": "x"}, {"type": "content"}, {"type": "content", "content": 3}):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4,
                                           prediction=prediction)  # type: ignore[arg-type]
        assert bad.value.param is not None and bad.value.param.startswith("prediction"), bad.value.param
