"""Images for vision-language models, end to end: a real server, mlx-vlm in its engine, tiny random Qwen2-VL and
Gemma 3 models (tests/support/tiny_vlm.py), the real `openai`, `anthropic` and `langchain-openai` clients.

A random model cannot see, so the proof that an image reaches the model is twofold: the prompt grows by the
image's tokens (Qwen2-VL: one token per 28x28 pixels, plus its vision_start/vision_end markers; Gemma 3: a fixed
count per image), and under
greedy decoding the reply is the same for the same image and different for a different one, in all three
APIs alike (they render the same prompt).
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import numpy as np
import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from PIL import Image

from tests.support.server import ServerProcess
from tests.support.tiny_models import make_tiny_model
from tests.support.tiny_vlm import GEMMA3_IMAGE_TOKENS, make_tiny_gemma3, make_tiny_qwen2_vl

VLM = "qwen2-vl"
GEMMA3 = "gemma3"
TEXT_ONLY = "tiny"
MAX_IMAGE_BYTES = 60_000
MAX_IMAGES = 3
TOKENS = 12
GREEDY = {"temperature": 0}  # the anthropic SDK 2.x has no sampling arguments: they travel in extra_body


def png(seed: int, size: int = 56) -> bytes:
    """Blocks of random colours, 4x4 of them, plus noise: pictures a random model tells apart (noise alone averages
    out in Gemma 3's pooling; a solid colour leaves little to tell)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3)).repeat(-(-size // 4), axis=0).repeat(-(-size // 4), axis=1)
    pixels = np.clip(blocks[:size, :size] + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    (folder / "one.png").write_bytes(png(1))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("vision-models")
    make_tiny_qwen2_vl(models / VLM)
    make_tiny_gemma3(models / GEMMA3)
    make_tiny_model(models / TEXT_ONLY)
    log = tmp_path_factory.mktemp("logs") / "server.log"
    server = ServerProcess(["--models-dir", str(models), "--max-tokens-default", str(TOKENS),
                            "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-images", str(MAX_IMAGES),
                            "--image-dir", str(image_dir)], log).start()
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(params=[VLM, GEMMA3])
def family(request: pytest.FixtureRequest) -> str:
    """The vision model a test runs on, one per family (Qwen2-VL, Gemma 3)."""
    return str(request.param)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, *urls: str, model: str = VLM, text: str = "What is in this picture?",
         **kwargs: Any) -> Any:
    parts: list[Any] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}],
                                          **{"max_tokens": TOKENS, "temperature": 0, **kwargs})


# -- the image reaches the model -------------------------------------------------------------------------


def test_an_image_adds_its_tokens_to_the_prompt(client: openai.OpenAI) -> None:
    text_only = chat(client).usage.prompt_tokens
    small = chat(client, data_url(png(1, 56))).usage.prompt_tokens
    large = chat(client, data_url(png(1, 112))).usage.prompt_tokens
    # 56x56 pixels are (56/28)^2 = 4 image tokens, framed by <|vision_start|> and <|vision_end|>; 112x112 are 16.
    assert small == text_only + 2 + 4
    assert large == text_only + 2 + 16
    two = chat(client, data_url(png(1)), data_url(png(2))).usage.prompt_tokens
    assert two == text_only + 2 * (2 + 4)


def test_gemma3_gives_every_image_the_same_tokens(client: openai.OpenAI) -> None:
    """Gemma 3 resizes every image to one square and pools it to a fixed count of soft tokens (256; here 4),
    framed by <start_of_image> and <end_of_image>."""
    text_only = chat(client, model=GEMMA3).usage.prompt_tokens
    small = chat(client, data_url(png(1, 56)), model=GEMMA3).usage.prompt_tokens
    large = chat(client, data_url(png(1, 112)), model=GEMMA3).usage.prompt_tokens
    two = chat(client, data_url(png(1)), data_url(png(2)), model=GEMMA3).usage.prompt_tokens
    assert small == large >= text_only + GEMMA3_IMAGE_TOKENS + 2
    assert two - small == small - text_only


def test_the_reply_depends_on_the_image_under_greedy_decoding(client: openai.OpenAI, family: str) -> None:
    first = chat(client, data_url(png(1)), model=family).choices[0].message.content
    again = chat(client, data_url(png(1)), model=family).choices[0].message.content
    other = chat(client, data_url(png(2)), model=family).choices[0].message.content
    assert first and first == again
    assert other != first


def test_low_detail_shrinks_a_large_image(client: openai.OpenAI) -> None:
    """detail "low": the image fits 512x512 before the processor; the model caps this one at 112x112 anyway
    (max_pixels), so both details give 16 tokens here: what is checked is that low is taken and changes nothing
    it should not."""
    url = data_url(png(3, 112))
    parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]
    low = client.chat.completions.create(model=VLM, messages=[{"role": "user", "content": parts}],  # type: ignore[misc]
                                         max_tokens=TOKENS, temperature=0)
    assert low.usage is not None and low.usage.prompt_tokens == chat(client, url, text="hi").usage.prompt_tokens


def test_streaming_gives_the_same_reply_as_the_whole_answer(client: openai.OpenAI, family: str) -> None:
    whole = chat(client, data_url(png(4)), model=family)
    stream = chat(client, data_url(png(4)), model=family, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_text_only_request_to_the_vision_model_is_served(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=VLM, messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage is not None


def test_structured_output_is_enforced_with_an_image(client: openai.OpenAI) -> None:
    """The request's grammar (and any penalties) run on the vision path as on the text path: the random model
    writes JSON; at max_tokens the grammar's closing reserve has closed it."""
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"],
              "additionalProperties": False}
    reply = chat(client, data_url(png(10)), response_format={
        "type": "json_schema", "json_schema": {"name": "picture", "schema": schema, "strict": True}},
        frequency_penalty=0.5)
    assert set(json.loads(reply.choices[0].message.content or "")) == {"colour"}


def test_responses_api_sees_the_same_image_the_same_way(client: openai.OpenAI, family: str) -> None:
    expected = chat(client, data_url(png(5)), model=family).choices[0].message.content
    content: Any = [{"type": "input_text", "text": "What is in this picture?"},
                    {"type": "input_image", "image_url": data_url(png(5)), "detail": "auto"}]
    response = client.responses.create(model=family, input=[{"role": "user", "content": content}],
                                       max_output_tokens=TOKENS, temperature=0)
    assert response.output_text == expected
    streamed = client.responses.create(model=family, input=[{"role": "user", "content": content}],
                                       max_output_tokens=TOKENS, temperature=0, stream=True)
    text = "".join(e.delta for e in streamed if e.type == "response.output_text.delta")
    assert text == expected


def test_messages_api_sees_the_same_image_the_same_way(client: openai.OpenAI, claude: anthropic.Anthropic,
                                                      family: str) -> None:
    expected = chat(client, data_url(png(6)), model=family).choices[0].message.content
    content: Any = [{"type": "text", "text": "What is in this picture?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": base64.b64encode(png(6)).decode()}}]
    message = claude.messages.create(model=family, max_tokens=TOKENS, extra_body=GREEDY,
                                     messages=[{"role": "user", "content": content}])
    assert "".join(b.text for b in message.content if b.type == "text") == expected
    with claude.messages.stream(model=family, max_tokens=TOKENS, extra_body=GREEDY,
                                messages=[{"role": "user", "content": content}]) as stream:
        assert "".join(stream.text_stream) == expected


def test_langchain_chat_openai_with_an_image_message(server: ServerProcess, client: openai.OpenAI,
                                                     family: str) -> None:
    expected = chat(client, data_url(png(7)), model=family).choices[0].message.content
    model = ChatOpenAI(model=family, base_url=server.base_url + "/v1", api_key="unused",  # type: ignore[arg-type]
                       temperature=0, max_tokens=TOKENS, max_retries=0)
    message = HumanMessage(content=[{"type": "text", "text": "What is in this picture?"},
                                    {"type": "image_url", "image_url": {"url": data_url(png(7))}}])
    assert model.invoke([message]).content == expected


def test_a_file_url_under_the_image_dir_is_read(client: openai.OpenAI, image_dir: Path) -> None:
    inline = chat(client, data_url(png(1))).choices[0].message.content
    assert chat(client, (image_dir / "one.png").as_uri()).choices[0].message.content == inline


def test_concurrent_requests_take_turns_and_each_gets_its_own_reply(client: openai.OpenAI) -> None:
    """A vision model serves one request at a time: concurrent ones wait their turn (and a text model's request
    runs beside them); each reply is the one it gets alone."""
    alone = {seed: chat(client, data_url(png(seed))).choices[0].message.content for seed in (11, 12, 13)}
    text_alone = client.chat.completions.create(model=TEXT_ONLY, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=TOKENS, temperature=0).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        replies = {seed: pool.submit(lambda s: chat(client, data_url(png(s))).choices[0].message.content, seed)
                   for seed in alone}
        text = pool.submit(lambda: client.chat.completions.create(
            model=TEXT_ONLY, messages=[{"role": "user", "content": "hi"}], max_tokens=TOKENS, temperature=0))
        assert {seed: reply.result(timeout=120) for seed, reply in replies.items()} == alone
        assert text.result(timeout=120).choices[0].message.content == text_alone


def test_a_client_leaving_mid_stream_ends_its_request_and_frees_the_model(server: ServerProcess,
                                                                          client: openai.OpenAI) -> None:
    never_stop = {"0": -100, "2": -100}  # <|endoftext|> and <|im_end|>: it would run to max_tokens
    stream = chat(client, data_url(png(14)), stream=True, max_tokens=3000, logit_bias=never_stop)
    next(iter(stream))
    stream.close()
    started = time.monotonic()
    assert chat(client, data_url(png(15))).choices[0].message.content  # its turn came: the model is free
    # 3000 tokens take this model 10 s or more here; a reply tens of milliseconds long comes well within 8.
    assert time.monotonic() - started < 8
    deadline = time.monotonic() + 10  # the engine's next heartbeat says so
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(server) == 0


def test_a_vision_request_past_the_timeout_ends_with_504_and_frees_the_model(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    make_tiny_qwen2_vl(tmp_path / "models" / VLM)
    server = start_server("--models-dir", str(tmp_path / "models"), "--request-timeout-s", "3",
                          "--preload-models", VLM, "--test-faults")
    server.wait_ready()
    deadline = time.monotonic() + 60  # loaded first: the timeout below runs on decoding alone
    while _status(server) != "loaded":
        assert time.monotonic() < deadline, _status(server)
        time.sleep(0.2)
    short = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    chat(short, data_url(png(1)))
    with pytest.raises(openai.APIStatusError) as caught:
        # Paced at ~20 steps/s ("slow" fault): 3000 tokens would take minutes, on any machine.
        chat(short, data_url(png(2)), max_tokens=3000, logit_bias={"0": -100, "2": -100}, user="fault:slow")
    assert caught.value.status_code == 504
    deadline = time.monotonic() + 5
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(server) == 0
    assert chat(short, data_url(png(3))).choices[0].message.content


def _status(server: ServerProcess) -> str:
    return str(httpx.get(f"{server.base_url}/v1/models/{VLM}", timeout=10).json()["status"])


def _running(server: ServerProcess) -> int:
    model = httpx.get(f"{server.base_url}/v1/models/{VLM}", timeout=10).json()
    return int(model["requests_running"])


def test_a_vision_model_is_unloaded_loaded_and_pinned_like_any(server: ServerProcess, client: openai.OpenAI) -> None:
    def admin(action: str) -> dict[str, Any]:
        answer = httpx.post(f"{server.base_url}/admin/models/{action}", json={"model": VLM}, timeout=60)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    reply = chat(client, data_url(png(16))).choices[0].message.content
    assert admin("unload")["status"] == "available"
    assert chat(client, data_url(png(16))).choices[0].message.content == reply  # loaded again for it
    assert admin("unload")["status"] == "available"
    loaded = admin("load")
    assert loaded["status"] == "loaded" and loaded["size_bytes"] > 0
    assert admin("pin")["pinned"] and not admin("unpin")["pinned"]


# -- refusals, each a clear 400 --------------------------------------------------------------------------


def refusal(call: Any) -> str:
    with pytest.raises((openai.BadRequestError, anthropic.BadRequestError)) as caught:
        call()
    return str(caught.value)


def test_an_http_image_is_refused_and_never_fetched(client: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    assert "never downloads" in refusal(lambda: chat(client, "https://example.com/cat.png"))
    content: Any = [{"type": "input_image", "image_url": "http://example.com/cat.png"}]
    assert "never downloads" in refusal(lambda: client.responses.create(
        model=VLM, input=[{"role": "user", "content": content}]))
    block: Any = [{"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]
    assert "never downloads" in refusal(lambda: claude.messages.create(
        model=VLM, max_tokens=4, messages=[{"role": "user", "content": block}]))


def test_an_image_for_a_text_only_model_is_refused_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, data_url(png(1)), model=TEXT_ONLY)
    assert f"The model '{TEXT_ONLY}' does not take images" in caught.value.message
    assert caught.value.code == "images_not_supported"


def test_too_large_and_too_many_images_are_refused(client: openai.OpenAI) -> None:
    big = png(8, 200)
    assert len(big) > MAX_IMAGE_BYTES
    assert "--max-image-bytes" in refusal(lambda: chat(client, data_url(big)))
    assert "at most 3" in refusal(lambda: chat(client, *[data_url(png(i)) for i in range(MAX_IMAGES + 1)]))


def test_bytes_that_are_not_an_image_are_refused(client: openai.OpenAI) -> None:
    assert "not a PNG, JPEG, GIF or WebP" in refusal(lambda: chat(client, data_url(b"hello, world")))
    assert "base64" in refusal(lambda: chat(client, "data:image/png;base64,@@@"))
    broken = png(1)[:40]  # a PNG's signature and header, then nothing
    assert "could not be decoded" in refusal(lambda: chat(client, data_url(broken)))


def test_a_file_url_outside_the_image_dir_is_refused(client: openai.OpenAI, image_dir: Path,
                                                     tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(1))
    assert "--image-dir" in refusal(lambda: chat(client, outside.as_uri()))
    (image_dir / "link.png").symlink_to(outside)  # a link inside that leads out
    assert "--image-dir" in refusal(lambda: chat(client, (image_dir / "link.png").as_uri()))


def test_the_server_stays_up_after_the_refusals(server: ServerProcess, client: openai.OpenAI) -> None:
    assert chat(client, data_url(png(9))).choices[0].message.content
    assert httpx.get(server.base_url + "/health", timeout=10).json()["engine"]["restarts"] == 0


def test_count_tokens_counts_the_images_tokens(client: openai.OpenAI, claude: anthropic.Anthropic,
                                              family: str) -> None:
    content: Any = [{"type": "text", "text": "What is in this picture?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": base64.b64encode(png(1, 112)).decode()}}]
    counted = claude.messages.count_tokens(model=family, messages=[{"role": "user", "content": content}])
    assert counted.input_tokens == chat(client, data_url(png(1, 112)), model=family).usage.prompt_tokens
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.count_tokens(model=TEXT_ONLY, messages=[{"role": "user", "content": content}])
