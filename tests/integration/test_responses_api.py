"""OpenAI's Responses API against a real server and engine: the official `openai` SDK (`responses.create`,
`responses.stream`, a function-tool round trip) and the OpenAI Agents SDK with its default (Responses) model.

'qwen' is a tiny random model wearing Qwen2.5's chat template: its calls are forced (tool_choice
"required" or a named function), so a random model still calls. The demo model writes text."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import Field

from tests.support.event_order import check_responses_events, named_events
from tests.support.server import ServerProcess

DEMO = "mlx-gateway-demo"
# Bounded values: a random model decoding greedily can loop inside an unbounded string or number.
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                       "days": {"type": "integer", "minimum": 1, "maximum": 14}},
                      "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": WEATHER_PARAMETERS}


@pytest.fixture(scope="module")
def client(agent_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=agent_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_create_answers_text_with_usage(client: openai.OpenAI) -> None:
    response = client.responses.create(model=DEMO, input="What is a generator?", instructions="Answer briefly.",
                                       max_output_tokens=40, temperature=0)
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    usage = response.usage
    assert usage is not None and 0 < usage.output_tokens <= 40 and usage.input_tokens > 5
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"


def test_stream_and_create_give_the_same_greedy_text_and_events_follow_the_documented_order(
    client: openai.OpenAI, agent_server: ServerProcess,
) -> None:
    request = {"model": DEMO, "input": "Tell me about lists.", "max_output_tokens": 30, "temperature": 0}
    whole = client.responses.create(**request).output_text  # type: ignore[call-overload]
    with client.responses.stream(**request) as stream:  # type: ignore[arg-type]
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == whole and len(deltas) > 1
    raw = httpx.post(agent_server.base_url + "/v1/responses", json={**request, "stream": True}, timeout=120)
    final = check_responses_events(named_events(raw.text))
    assert final["output"][0]["content"][0]["text"] == whole


def test_a_function_tool_round_trip_by_previous_response_id(client: openai.OpenAI) -> None:
    first = client.responses.create(model="qwen", input="What is the weather in Paris?", tools=[WEATHER],  # type: ignore[list-item]
                                    tool_choice="required", max_output_tokens=200, temperature=0)
    assert first.status == "completed"
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and all(call.name == "get_weather" for call in calls)
    arguments = json.loads(calls[0].arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    second = client.responses.create(
        model="qwen", previous_response_id=first.id, tools=[WEATHER], max_output_tokens=20, temperature=0,  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 22C"} for call in calls],
    )
    assert second.status in ("completed", "incomplete") and second.previous_response_id == first.id
    # The continuation's prompt holds the first turn: more input than the first request had.
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    assert client.responses.retrieve(first.id).id == first.id


def test_a_stateless_round_trip_sends_the_call_back_as_input(client: openai.OpenAI) -> None:
    question = {"role": "user", "content": "Weather in Rome?"}
    first = client.responses.create(model="qwen", input=[question], store=False,  # type: ignore[list-item]
                                    tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},  # type: ignore[list-item]
                                    parallel_tool_calls=False, max_output_tokens=200, temperature=0)
    (call,) = [item for item in first.output if item.type == "function_call"]
    second = client.responses.create(
        model="qwen", store=False, tools=[WEATHER], max_output_tokens=10, temperature=0,  # type: ignore[list-item]
        input=[question, *[item.model_dump(exclude_none=True) for item in first.output],  # type: ignore[list-item]
               {"type": "function_call_output", "call_id": call.call_id, "output": "Rainy, 14C"}],
    )
    assert second.usage is not None and second.usage.output_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_a_streamed_forced_call_through_the_stream_helper(client: openai.OpenAI) -> None:
    with client.responses.stream(model="qwen", input="Weather in Oslo for 3 days?", tools=[WEATHER],  # type: ignore[list-item]
                                 tool_choice="required", max_output_tokens=200, temperature=0) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in types
    call = next(item for item in final.output if item.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)


def test_text_format_json_schema_is_enforced(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                        "maxItems": 3}},
              "required": ["name", "tags"], "additionalProperties": False}
    for seed_temperature in (0.0, 1.0):
        response = client.responses.create(
            model="json", input="Describe a thing.", max_output_tokens=300, temperature=seed_temperature,
            text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}},
        )
        assert response.status == "completed", response.output_text
        jsonschema.validate(json.loads(response.output_text), schema)


def test_a_hosted_tool_declared_beside_a_namespace_tool_leaves_the_namespace_functions_callable(
    client: openai.OpenAI,
) -> None:
    """Codex's default tools: a namespace of functions and web_search. The function inside the namespace is
    forced here, so the random model calls it; the call names its namespace."""
    namespace = {"type": "namespace", "name": "weather_tools", "description": "Weather.", "tools": [WEATHER]}
    response = client.responses.create(
        model="qwen", input="Weather in Paris?", max_output_tokens=200,
        tools=[namespace, {"type": "web_search", "external_web_access": False}],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": WEATHER["name"]},  # type: ignore[arg-type,typeddict-item]
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert (call.name, call.namespace) == (WEATHER["name"], "weather_tools")
    assert set(json.loads(call.arguments)) <= set(WEATHER["parameters"]["properties"])  # type: ignore[index]


def test_refusals_are_bad_requests_naming_the_parameter(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as built_in:  # declared, it is not offered; forced, it is a 400
        client.responses.create(model=DEMO, input="hi", tools=[{"type": "web_search"}],  # type: ignore[list-item]
                                tool_choice={"type": "web_search"})  # type: ignore[arg-type,typeddict-item]
    assert built_in.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as unknown:
        client.responses.create(model=DEMO, input="hi", previous_response_id="resp_nope")
    assert unknown.value.code == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as tool_less_model:
        client.responses.create(model="tiny", input="hi", tools=[WEATHER], tool_choice="required")  # type: ignore[list-item]
    assert "does not support tool calling" in str(tool_less_model.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="hi")


# -- the OpenAI Agents SDK, with its default model (the Responses API) ------------------------------------


def _run_agent(base_url: str, prompt: str, **agent_options: Any) -> tuple[Any, list[tuple[str, int]], list[Any]]:
    """Run a weather agent; returns (the run's result or the SDK's error, the tool's calls, each model call's
    input items)."""
    from agents import (
        Agent,
        AgentsException,
        ModelSettings,
        RunConfig,
        RunHooks,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from agents.models.openai_provider import OpenAIProvider

    set_tracing_disabled(True)  # no exporter: nothing may leave the machine
    calls: list[tuple[str, int]] = []
    inputs: list[Any] = []

    @function_tool  # bounded arguments, as above (the SDK makes its tools strict: the schema is enforced)
    def get_weather(city: Annotated[str, Field(max_length=12)], days: Annotated[int, Field(ge=1, le=14)]) -> str:
        """The weather in a city for the next days."""
        calls.append((city, days))
        return f"Sunny in {city} for {days} days"

    class Inputs(RunHooks[Any]):
        async def on_llm_start(self, context: Any, agent: Any, system_prompt: Any, input_items: Any) -> None:
            inputs.append(list(input_items))

    async def run() -> Any:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        provider = OpenAIProvider(openai_client=client, use_responses=True)
        agent = Agent(name="weather", instructions="Use the tool.", model="qwen", tools=[get_weather],
                      model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
                      **agent_options)
        try:
            return await Runner.run(agent, prompt, run_config=RunConfig(model_provider=provider), max_turns=3,
                                    hooks=Inputs())
        except AgentsException as exc:
            return exc
        finally:
            await client.close()

    return asyncio.run(run()), calls, inputs


def test_an_agent_calls_its_function_tool_through_the_responses_api(agent_server: ServerProcess) -> None:
    result, calls, _ = _run_agent(agent_server.base_url, "What is the weather in Paris?",
                                  tool_use_behavior="stop_on_first_tool")
    assert len(calls) >= 1 and all(isinstance(city, str) and 1 <= days <= 14 for city, days in calls)
    assert result.final_output.startswith("Sunny in ")
    assert all(r.usage.output_tokens > 0 for r in result.raw_responses)


def test_an_agent_sends_the_tool_result_back_to_the_model(agent_server: ServerProcess) -> None:
    """After the call, the SDK resets tool_choice to auto and sends the conversation back with the call and its
    output. A random model's free text then runs to max_output_tokens: the response is `incomplete`, which the
    SDK reports as a ModelBehaviorError (as with OpenAI); a model that ended its reply would finish the run."""
    from agents import ModelBehaviorError

    result, calls, inputs = _run_agent(agent_server.base_url, "What is the weather in Rome?")
    assert calls and len(inputs) == 2
    sent = {item.get("type") for item in inputs[1] if isinstance(item, dict)}
    assert {"function_call", "function_call_output"} <= sent
    output = next(i for i in inputs[1] if isinstance(i, dict) and i.get("type") == "function_call_output")
    assert output["output"].startswith("Sunny in ")
    if isinstance(result, ModelBehaviorError):
        assert "response.incomplete" in str(result) and "max_output_tokens" in str(result)
    else:
        assert isinstance(result.final_output, str)


def test_metrics_count_the_route_by_name(client: openai.OpenAI, agent_server: ServerProcess) -> None:
    client.responses.create(model=DEMO, input="hi", max_output_tokens=3)
    text = httpx.get(agent_server.base_url + "/metrics", timeout=10).text
    assert 'mlx_gateway_http_requests_total{method="POST",route="/v1/responses",status="200"}' in text
