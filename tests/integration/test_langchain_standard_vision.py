"""LangChain's standard integration suite (`langchain-tests`' ChatModelIntegrationTests) for `ChatOpenAI` against a
real server and a tiny random Qwen2-VL (tests/support/tiny_vlm.py), with its image-input flag on (issue 24).

Image inputs: `supports_image_inputs` is on, so `test_image_inputs` sends an image as an OpenAI `image_url` data
URL and as LangChain's standard `{"type": "image", "base64": ...}` block. The suite downloads its picture from
GitHub with `httpx.get`; this machine (and the server, by design) is offline, so that one download is answered
with a local PNG: the server still receives a real image, base64 in the request, as in the suite.
`supports_image_urls` stays off: an http(s) image is refused by design (the gateway never fetches), and
`supports_image_tool_message` too (images are taken in user messages). Qwen2-VL's chat template has no tools,
so the tool-calling tests are off (`has_tool_calling`). The model is random: tests whose outcome needs a model
that understands its prompt are xfail (strict) with the reason.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.langchain_standard import structured_output_xfails
from tests.support.tiny_vlm import make_tiny_qwen2_vl

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

VLM = "qwen2-vl"
SUITE_IMAGE = "https://raw.githubusercontent.com/langchain-ai/docs/"  # the suite's picture, under this prefix

LOOPS_IN_A_STRING = (
    "a random model under the output grammar writes one string until max_tokens; the grammar's closing reserve "
    "closes the JSON (it parses: tests/integration/test_vision.py), but finish_reason is 'length', and the openai "
    "SDK's parse() that LangChain uses raises LengthFinishReasonError on 'length' by design"
)
NO_TOOLS_IN_THE_TEMPLATE = ("a Pydantic v1 schema makes LangChain use function calling, and Qwen2-VL's chat "
                            "template has no tools: a 400 saying so")


@pytest.fixture(scope="module", autouse=True)
def suite_image_offline() -> Iterator[None]:
    """The suite's `httpx.get` of its picture answered with a local PNG (this machine has no network)."""
    pixels = np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    real_get = httpx.get

    def get(url: str, *args: Any, **kwargs: Any) -> Any:
        if str(url).startswith(SUITE_IMAGE):
            return httpx.Response(200, content=out.getvalue(), request=httpx.Request("GET", url))
        return real_get(url, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(httpx, "get", get)
        yield


class TestChatOpenAIOnAVisionModel(
    structured_output_xfails(LOOPS_IN_A_STRING, pydantic_2_v1=NO_TOOLS_IN_THE_TEMPLATE),
):
    served_model = VLM
    chat_params: ClassVar[dict[str, Any]] = {"temperature": 0.7, "seed": 1, "max_tokens": 32}

    def server_args(self, models: Path, request: pytest.FixtureRequest) -> list[str]:
        make_tiny_qwen2_vl(models / VLM)
        return ["--models-dir", str(models), "--max-tokens-default", "32"]

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def has_tool_calling(self) -> bool:
        return False
