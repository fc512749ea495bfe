"""The six tests of LangChain's standard suite that the demo model xfails as "needs a trained model"
(tests/integration/test_langchain_standard.py), re-run on the bundled real model, SmolLM2-135M-Instruct
(issue 25), through `ChatOpenAI` and a real server. Each runs the suite's own test method with the suite's
own parameters; each passes, or keeps an xfail with the reason seen on this model (strict, so a change shows).

Only these six run here: the rest of the suite checks structure, which the demo model already proves, and a
real model on a CPU costs seconds per answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from tests.support.real_model import MODEL_ID
from tests.support.server import ServerProcess

pytestmark = pytest.mark.slow

_server: dict[str, ServerProcess] = {}


class _OnSmolLM2(ChatModelIntegrationTests):
    """The suite's settings for this server (not collected: only its six methods are called, below)."""

    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": MODEL_ID, "base_url": _server["smollm2"].base_url + "/v1", "api_key": "unused",
                "max_retries": 0, "temperature": 0, "max_tokens": 160, "timeout": 600, "stream_usage": True}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True


SUITE = _OnSmolLM2()


@pytest.fixture(scope="module", autouse=True)
def smollm2_server(smollm2_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    # A real model on a loaded 2-core CPU can spend longer than the default stall timeout on one prefill.
    server = ServerProcess(["--models-dir", str(smollm2_models_dir), "--stall-timeout-s", "600"], log).start()
    server.wait_ready()
    _server["smollm2"] = server
    yield server
    server.stop()


def model(**extra: Any) -> ChatOpenAI:
    return ChatOpenAI(**{**SUITE.standard_chat_model_params, **SUITE.chat_model_params, **extra})


# Seen on 2026-12-07 (greedy, max_tokens 160, conversion v3), each outcome below.
FORCED_REPEATS = ("forced with tool_choice 'any' it calls the right tool with the right arguments ({'input': 3}), then "
                  "repeats the call until max_tokens (5 calls): the 'required' grammar allows parallel calls and "
                  "this model never closes the list (the grammar must end it: issue 20's 'forced tool calls end')")


@pytest.mark.xfail(strict=True, reason=FORCED_REPEATS)
@pytest.mark.parametrize("output_version", [None, "v1"])
def test_tool_calling(output_version: str | None) -> None:
    SUITE.test_tool_calling(model(**({"output_version": output_version} if output_version else {})))


@pytest.mark.xfail(strict=True, reason=FORCED_REPEATS)
@pytest.mark.anyio
async def test_tool_calling_async() -> None:
    await SUITE.test_tool_calling_async(model())


@pytest.mark.xfail(strict=True, reason=FORCED_REPEATS.replace("({'input': 3})", "({})"))
def test_tool_calling_with_no_arguments() -> None:
    SUITE.test_tool_calling_with_no_arguments(model())


@pytest.mark.xfail(strict=True, reason="json_object mode: the reply reaches max_tokens (160) before its JSON ends "
                   "(finish_reason length, so the OpenAI SDK raises LengthFinishReasonError)")
def test_json_mode() -> None:
    SUITE.test_json_mode(model())


@pytest.mark.xfail(strict=True, reason="with tool_choice auto it makes no tool call for the weather question: "
                   "SmolLM2-135M was not trained on this tool layout (the 1.7B was trained for function calling)")
@pytest.mark.parametrize("output_version", [None, "v1"])
def test_agent_loop(output_version: str | None) -> None:
    SUITE.test_agent_loop(model(**({"output_version": output_version} if output_version else {})))


def test_unicode_tool_call_integration() -> None:  # passes: forced, its arguments echo '你好啊集团'
    SUITE.test_unicode_tool_call_integration(model())
