"""LangChain's own standard integration suite (`langchain-tests`' ChatModelIntegrationTests) for
`ChatOpenAI` against a real server and the bundled demo model (issue 9).

The demo model is 2M parameters trained for minutes: it writes Python-documentation-flavoured nonsense.
Everything whose outcome is structure passes (tool calls are forced with tool_choice "any", structured
output is enforced by the grammar); the tests that need a model that understands what it is told are
marked xfail below, each with the reason, so a change in their outcome shows (strict). The suite skips by
itself what its capability flags say a text-only server does not take (images, PDFs, audio, Anthropic
content blocks) and its recorded-HTTP timing test; the suite forbids overriding those, and our own 400s for
such parts are tested in tests/unit/gateway/test_errors.py and the API tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from mlx_backend.demo import DEMO_MODEL_ID
from tests.support.server import ServerProcess
from tests.support.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

_server: dict[str, ServerProcess] = {}

NEEDS_A_TRAINED_MODEL = "needs a model that understands the prompt; the demo model is 2M parameters of nonsense"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
async def one_event_loop_for_the_module(anyio_backend: str) -> AsyncIterator[None]:
    """ChatOpenAI caches its async HTTP client across model instances, so every async test must run on the
    same event loop; a module-scoped async fixture keeps anyio's runner (and its loop) alive between them."""
    yield


@pytest.fixture(scope="module", autouse=True)
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log: Path = tmp_path_factory.mktemp("logs") / "server.log"
    models = tmp_path_factory.mktemp("models")
    make_tiny_model(models / "tiny")  # the other model the model-override tests switch to
    server = ServerProcess(["--demo-model", "--models-dir", str(models), "--max-tokens-default", "128"], log).start()
    server.wait_ready()
    _server["demo"] = server
    yield server
    server.stop()


class TestChatOpenAIOnMlxGateway(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": DEMO_MODEL_ID, "base_url": _server["demo"].base_url + "/v1", "api_key": "unused",
                "max_retries": 0, "temperature": 0.7, "seed": 1, "max_tokens": 400, "stream_usage": True}

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

    # -- tests that need a trained model ------------------------------------------------------------------

    @pytest.mark.xfail(strict=True, reason=NEEDS_A_TRAINED_MODEL + ": forced with tool_choice 'any' (required, "
                       "parallel calls allowed) it makes a valid call, then more calls instead of stopping at one")
    def test_tool_calling(self, model: Any) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(strict=True, reason=NEEDS_A_TRAINED_MODEL + ": as test_tool_calling")
    async def test_tool_calling_async(self, model: Any) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(strict=True, reason=NEEDS_A_TRAINED_MODEL + ": json mode promises a JSON object, and it "
                       "writes one; the test also wants the keys it asked for in words")
    def test_json_mode(self, model: Any) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(strict=True, reason=NEEDS_A_TRAINED_MODEL + ": with tool_choice auto it must decide to call")
    def test_agent_loop(self, model: Any) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(strict=True, reason=NEEDS_A_TRAINED_MODEL + ": its arguments must echo the Chinese it is "
                       "asked to pass")
    def test_unicode_tool_call_integration(self, model: Any, **kwargs: Any) -> None:
        super().test_unicode_tool_call_integration(model, **kwargs)
