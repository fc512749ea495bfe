"""Every body a real server sends, in a broad set of scenarios (tests/support/conformance.py), validates against
OpenAI's published OpenAPI document and Anthropic's SDK-generated schema (tests/contract/references/), with the
recorded exceptions only; and every event and block type our wire types can send is seen in some scenario, so
a new one cannot go unchecked.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.messages import wire as messages_wire
from gateway.responses import wire as responses_wire
from tests.support import conformance
from tests.support.conformance import SCENARIOS, Body, Scenario
from tests.support.server import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[Body]]]:
    root = conformance.make_models(tmp_path_factory.mktemp("conformance-models"))
    log = tmp_path_factory.mktemp("logs") / "server.log"
    server = ServerProcess(["--models-dir", str(root), *conformance.SERVER_ARGS], log).start()
    try:
        server.wait_ready()
        yield {scenario.name: conformance.collect(server.base_url, scenario) for scenario in SCENARIOS}
    finally:
        server.stop()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_every_body_conforms_to_the_official_schema(answers: dict[str, list[Body]], scenario: Scenario) -> None:
    bodies = answers[scenario.name]
    assert bodies, "the scenario got no body at all"
    problems = [f"[{body.event or 'body'} {body.status}] {v}" for body in bodies for v in conformance.violations(body)]
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.body is not None], ids=lambda s: s.name)
def test_the_published_document_accepts_what_the_server_served(answers: dict[str, list[Body]],
                                                               scenario: Scenario) -> None:
    """Our own OpenAPI document (openapi/openapi.json) is honest about requests: a body the server answered is
    valid against the route's request schema, and one it refused as malformed is not."""
    import json

    import jsonschema

    from gateway.cli import OPENAPI_PATH

    document = json.loads(OPENAPI_PATH.read_text())
    schema = document["paths"][scenario.path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    errors = list(jsonschema.Draft202012Validator({**document, **schema}).iter_errors(scenario.body))
    status = answers[scenario.name][0].status
    if status == 200:
        assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors]
    elif status == 400:
        assert errors, "the server refused a body its published document calls valid"


def _types(union: Any) -> set[str]:
    """The `type` values the members of a union of our wire types can take (their tag, or Literal values)."""
    found: set[str] = set()
    for member in typing.get_args(union):
        tag = member.__struct_config__.tag
        if isinstance(tag, str):
            found.add(tag)
        else:
            found.update(typing.get_args(typing.get_type_hints(member)["type"]))
    return found


def _seen(answers: dict[str, list[Body]], api: str) -> list[Body]:
    return [body for bodies in answers.values() for body in bodies if body.api == api]


def test_every_responses_event_and_item_type_was_checked(answers: dict[str, list[Body]]) -> None:
    bodies = _seen(answers, "responses")
    assert _types(responses_wire.StreamEvent) <= {b.event for b in bodies}
    outputs = [i for b in bodies if b.event is None and b.status == 200 for i in b.data["output"]]
    assert _types(responses_wire.OutputItem) <= {i["type"] for i in outputs}
    assert any(i["type"] == "function_call" and i.get("namespace") for i in outputs), "a call naming its namespace"
    parts = {b.data["part"]["type"] for b in bodies if b.event == "response.content_part.added"}
    assert {"output_text", "reasoning_text"} <= parts


def test_every_messages_event_block_and_delta_type_was_checked(answers: dict[str, list[Body]]) -> None:
    bodies = _seen(answers, "messages")
    assert _types(messages_wire.StreamEvent) | {"error"} <= {b.event for b in bodies}
    blocks = {b.data["content_block"]["type"] for b in bodies if b.event == "content_block_start"}
    assert _types(messages_wire.ContentBlock) <= blocks
    deltas = {b.data["delta"]["type"] for b in bodies if b.event == "content_block_delta"}
    delta_union = typing.get_type_hints(messages_wire.ContentBlockDeltaEvent)["delta"]
    assert _types(delta_union) <= deltas


def test_chat_covers_tool_calls_logprobs_several_choices_and_errors(answers: dict[str, list[Body]]) -> None:
    bodies = _seen(answers, "chat")
    whole = [b.data for b in bodies if b.event is None and b.status == 200]
    assert any(c["message"].get("tool_calls") for w in whole for c in w["choices"])
    assert any(c["logprobs"] for w in whole for c in w["choices"])
    assert any(len(w["choices"]) == 2 for w in whole)
    assert any(b.event and "error" in b.data for b in bodies), "an error event inside a stream"
    assert {400, 404, 500} <= {b.status for b in bodies}


def test_chat_covers_a_reasoning_models_reasoning_content_and_its_token_count(answers: dict[str, list[Body]]) -> None:
    bodies = [b for b in _seen(answers, "chat") if b.status == 200]
    messages = [c["message"] for b in bodies if b.event is None for c in b.data["choices"]]
    deltas = [c["delta"] for b in bodies if b.event is not None for c in b.data.get("choices", ())]
    assert any(m.get("reasoning_content") for m in messages)
    assert any(d.get("reasoning_content") for d in deltas)
    counted = [b for b in bodies if (b.data.get("usage") or {}).get("completion_tokens_details")]
    assert {b.event is None for b in counted} == {True, False}, "reasoning_tokens whole and in a usage chunk"
    assert all(b.data["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0 for b in counted)


def test_the_references_are_the_recorded_versions() -> None:
    """The vendored files say where they come from; a refresh must keep saying it."""
    import json

    openai = json.loads(Path(conformance.OPENAI_FILE).read_text())["x-source"]
    anthropic = json.loads(Path(conformance.ANTHROPIC_FILE).read_text())["x-source"]
    assert openai["repository"] == "https://github.com/openai/openai-openapi" and len(openai["commit"]) == 40
    assert anthropic["package"].startswith("@anthropic-ai/sdk") and anthropic["version"]
    assert all(d.reason for d in conformance.EXCEPTIONS)
