"""LangChain's standard integration suite (`langchain-tests`' ChatModelIntegrationTests) for `ChatOpenAI`
against a real server and a real trained model: SmolLM2-135M-Instruct as users get it (`smollm2-135m-instruct`,
with the bundled tools-capable template mlx_backend/smollm2/chat_template.jinja). The demo model's run is
test_langchain_standard.py; issue 26 found failures here that the demo model hides.

A 135M model understands simple requests and follows a forced format; it does not reliably pick a tool on
its own, nor echo Chinese text. Each test it fails for that reason is marked xfail with what the model did
(strict, so an improvement shows). Greedy decoding (temperature 0), so the outcomes are reproducible. The
machine running these is a shared 2-core CPU: the stall limit is raised so a slow prefill is not taken for
a frozen engine, and max_tokens is kept short: 128 (the longest passing answer is 105 tokens), and 64 for the
structured-output tests, whose xfails run to the limit (a joke in their JSON is about 28 tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.support.langchain_standard import structured_output_xfails
from tests.support.real_model import MODEL_ID, warm_up
from tests.support.server import ServerProcess

LOOPS_IN_A_STRING = (
    "greedy, the model loops inside the first string ('\"setup\": \"A cat is a cat, right? A cat is a cat, right? "
    "...') until max_tokens; the closing reserve closes the JSON (it parses and validates, with an empty "
    "punchline), but finish_reason is 'length', and the openai SDK's parse() that LangChain uses raises "
    "LengthFinishReasonError on 'length' by design"
)
JSON_MODE_NESTS = (
    "json_object mode: greedy, the model nests '{\"setup\":{\"setup\":' six deep, then loops inside the string "
    "('the cat was having a cat-themed party, and ...') until max_tokens; the object is closed (it parses), but "
    "finish_reason is 'length'"
)

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

JOKE_BUDGET = 64  # a joke as the suite's Joke JSON is about 28 tokens here: twice that and more


class TestChatOpenAIOnSmolLM2(
    structured_output_xfails(LOOPS_IN_A_STRING, json_mode=JSON_MODE_NESTS, max_tokens=JOKE_BUDGET),
):
    served_model = MODEL_ID
    # The longest answer of a passing test is the unicode tool call's arguments: 105 tokens.
    chat_params: ClassVar[dict[str, Any]] = {"temperature": 0, "max_tokens": 128, "timeout": 900}

    def server_args(self, models: Path, request: pytest.FixtureRequest) -> list[str]:
        smollm2: Path = request.getfixturevalue("smollm2_models_dir")
        return ["--models-dir", str(smollm2), "--models-dir", str(models),
                "--max-tokens-default", "128", "--stall-timeout-s", "300"]

    def wait_until_serving(self, server: ServerProcess) -> None:
        server.wait_ready(timeout_s=120)
        warm_up(server)

    # -- what this 135M model does not do (bundled template, run of 2026-12-07: 32 passed, 10 xfailed, 7 skipped) --
    # (the structured-output tests and json mode: the base class above, with the reasons above)

    @pytest.mark.xfail(strict=True, reason="with tool_choice auto, asked 'What is the weather in San "
                       "Francisco, CA?', the model answers in text ('... a high of 88°F (30°C) and a low of 69°F') "
                       "instead of calling get_weather (forced calls name the city: test_real_model_constrained.py)")
    def test_agent_loop(self, model: Any) -> None:
        super().test_agent_loop(model)
