"""LangChain's standard integration suite (`langchain-tests`' ChatModelIntegrationTests) run with `ChatOpenAI`
against a real server process: what tests/integration/test_langchain_standard*.py share.

`ChatOpenAIOnAGateway` starts one server per test class (its `server_args`), with the tiny model "tiny" beside
the model under test for the model-override tests, and runs the class's async tests on one event loop.
`structured_output_xfails(...)` is that class with the structured-output tests strict xfail, for a model that
writes one string until max_tokens under the output grammar, each with the reason the caller gives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from tests.support.server import ServerProcess
from tests.support.tiny_models import make_tiny_model

OVERRIDE_MODEL = "tiny"  # the other model the model-override tests switch to


class ChatOpenAIOnAGateway(ChatModelIntegrationTests):
    """The suite's ChatOpenAI against one real server per class, serving `served_model` with `chat_params`."""

    served_model: ClassVar[str]
    chat_params: ClassVar[dict[str, Any]]  # sampling and client settings beyond model, URL and key
    server: ClassVar[ServerProcess]

    def server_args(self, models: Path, request: pytest.FixtureRequest) -> list[str]:
        """The `serve` arguments; `models` is a --models-dir that already holds the override model."""
        raise NotImplementedError

    def wait_until_serving(self, server: ServerProcess) -> None:
        server.wait_ready()

    @pytest.fixture(scope="class")
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture(scope="class", autouse=True)
    async def one_event_loop_for_the_class(self, anyio_backend: str) -> AsyncIterator[None]:
        """ChatOpenAI caches its async HTTP client across model instances, so every async test must run on the
        same event loop; a class-scoped async fixture keeps anyio's runner (and its loop) alive between them."""
        yield

    @pytest.fixture(scope="class", autouse=True)
    def gateway(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
        models = tmp_path_factory.mktemp("models")
        make_tiny_model(models / OVERRIDE_MODEL)
        log = tmp_path_factory.mktemp("logs") / "server.log"
        server = ServerProcess(self.server_args(models, request), log).start()
        try:
            self.wait_until_serving(server)
            type(self).server = server
            yield server
        finally:
            server.stop()

    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": self.served_model, "base_url": self.server.base_url + "/v1", "api_key": "unused",
                "max_retries": 0, "stream_usage": True, **self.chat_params}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False  # a vision model's class says True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return OVERRIDE_MODEL


def structured_output_xfails(
    reason: str, *, json_mode: str | None = None, pydantic_2_v1: str | None = None, max_tokens: int | None = None,
) -> type[ChatOpenAIOnAGateway]:
    """`ChatOpenAIOnAGateway` with its structured-output tests strict xfail with `reason` (json mode's and the
    Pydantic v1 schema's own reasons where they fail otherwise); a subclass, not a second base class, as the
    suite's test_no_overrides wants one path to ChatModelIntegrationTests. `max_tokens`, if given, is those
    tests' budget in place of the class's: a model that runs to the limit there reaches it sooner, and fails the
    same way."""

    def budgeted(model: Any) -> Any:
        return model if max_tokens is None else model.model_copy(update={"max_tokens": max_tokens})

    class Overrides(ChatOpenAIOnAGateway):
        @pytest.mark.xfail(strict=True, reason=reason)
        @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
        def test_structured_output(self, model: Any, schema_type: Any) -> None:
            super().test_structured_output(budgeted(model), schema_type)

        @pytest.mark.xfail(strict=True, reason=reason)
        @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
        async def test_structured_output_async(self, model: Any, schema_type: Any) -> None:
            await super().test_structured_output_async(budgeted(model), schema_type)

        @pytest.mark.xfail(strict=True, reason=reason)
        def test_structured_output_optional_param(self, model: Any) -> None:
            super().test_structured_output_optional_param(budgeted(model))

        @pytest.mark.xfail(strict=True, reason=pydantic_2_v1 or reason)
        def test_structured_output_pydantic_2_v1(self, model: Any) -> None:
            super().test_structured_output_pydantic_2_v1(budgeted(model))

        @pytest.mark.xfail(strict=True, reason=json_mode or reason)
        def test_json_mode(self, model: Any) -> None:
            super().test_json_mode(budgeted(model))

    return Overrides
