"""LangChain's standard integration suite (`langchain-tests`' ChatModelIntegrationTests) for `ChatOpenAI`
against a real server and a real trained model: SmolLM2-135M-Instruct as users get it (`smollm2-135m-instruct`,
with the bundled tools-capable template mlx_backend/smollm2/chat_template.jinja). The demo model's run is
test_langchain_standard.py; issue 26 found failures here that the demo model hides.

A 135M model understands simple requests and follows a forced format; it does not reliably pick a tool on
its own, nor echo Chinese text. Each test it fails for that reason is marked xfail with what the model did
(strict, so an improvement shows). Greedy decoding (temperature 0), so the outcomes are reproducible. The
machine running these is a shared 2-core CPU: the stall limit is raised so a slow prefill is not taken for
a frozen engine, and max_tokens is kept short.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from tests.support.real_model import MODEL_ID, warm_up
from tests.support.server import ServerProcess
from tests.support.tiny_models import make_tiny_model

LOOPS_IN_A_STRING = (
    "greedy, the model loops inside the first string ('\"setup\": \"A cat is a cat, right? A cat is a cat, right? "
    "...') until max_tokens; the closing reserve closes the JSON (it parses and validates, with an empty "
    "punchline), but finish_reason is 'length', and the openai SDK's parse() that LangChain uses raises "
    "LengthFinishReasonError on 'length' by design"
)

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

_server: dict[str, ServerProcess] = {}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
async def one_event_loop_for_the_module(anyio_backend: str) -> AsyncIterator[None]:
    """ChatOpenAI caches its async HTTP client across model instances: one event loop for the module."""
    yield


@pytest.fixture(scope="module", autouse=True)
def real_server(smollm2_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log: Path = tmp_path_factory.mktemp("logs") / "server.log"
    others = tmp_path_factory.mktemp("models")
    make_tiny_model(others / "tiny")  # the other model the model-override tests switch to
    server = ServerProcess(["--models-dir", str(smollm2_models_dir), "--models-dir", str(others),
                            "--max-tokens-default", "128", "--stall-timeout-s", "300"], log).start()
    server.wait_ready(timeout_s=120)
    warm_up(server)
    _server["real"] = server
    yield server
    server.stop()


class TestChatOpenAIOnSmolLM2(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": MODEL_ID, "base_url": _server["real"].base_url + "/v1", "api_key": "unused",
                "max_retries": 0, "temperature": 0, "max_tokens": 160, "stream_usage": True, "timeout": 900}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def model_override_value(self) -> str:
        return "tiny"

    # -- what this 135M model does not do (bundled template, run of 2026-12-07: 32 passed, 10 xfailed, 7 skipped) --

    @pytest.mark.xfail(strict=True, reason=LOOPS_IN_A_STRING)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model: Any, schema_type: Any) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.xfail(strict=True, reason=LOOPS_IN_A_STRING)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model: Any, schema_type: Any) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(strict=True, reason=LOOPS_IN_A_STRING)
    def test_structured_output_pydantic_2_v1(self, model: Any) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(strict=True, reason=LOOPS_IN_A_STRING)
    def test_structured_output_optional_param(self, model: Any) -> None:
        super().test_structured_output_optional_param(model)

    @pytest.mark.xfail(strict=True, reason="json_object mode: greedy, the model nests '{\"setup\":{\"setup\":' six "
                       "deep, then loops inside the string ('the cat was having a cat-themed party, and ...') until "
                       "max_tokens; the object is closed (it parses), but finish_reason is 'length'")
    def test_json_mode(self, model: Any) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(strict=True, reason="with tool_choice auto, asked 'What is the weather in San "
                       "Francisco, CA?', the model answers in text ('... a high of 88°F (30°C) and a low of 69°F') "
                       "instead of calling get_weather (forced calls name the city: test_real_model_constrained.py)")
    def test_agent_loop(self, model: Any) -> None:
        super().test_agent_loop(model)
