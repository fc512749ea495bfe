"""gateway/serving/images.py: where an image may come from, and every refusal a 400 invalid_image naming the part."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from gateway.errors import ErrorKind, GatewayError
from gateway.serving import images
from mlx_backend.contract import ChatMessage, Generate, ImageInput, SamplingParams

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # only the signature matters to the gateway; the engine decodes
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 32
GIF = b"GIF89a" + b"\x00" * 32
WEBP = b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 32


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def refused(call: object, *args: object, **kwargs: object) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    assert caught.value.kind is ErrorKind.INVALID_IMAGE and caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(("data", "media_type"), [(PNG, "image/png"), (JPEG, "image/jpeg"), (GIF, "image/gif"),
                                                  (WEBP, "image/webp")])
def test_a_base64_data_url_is_taken_with_the_type_its_bytes_say(data: bytes, media_type: str) -> None:
    image = images.from_url(data_url(data, media_type), "p")
    assert image == ImageInput(data, media_type)


def test_image_jpg_is_an_alias_of_jpeg() -> None:
    assert images.from_url(data_url(JPEG, "image/jpg"), "p").media_type == "image/jpeg"


@pytest.mark.parametrize("url", ["http://example.com/a.png", "https://example.com/a.png", "HTTPS://x/y"])
def test_an_http_url_is_never_fetched(url: str) -> None:
    error = refused(images.from_url, url, "messages[0].content[1].image_url")
    assert "never downloads" in error.message and error.param == "messages[0].content[1].image_url"


@pytest.mark.parametrize(("url", "says"), [
    ("ftp://x/a.png", "base64 data URL"),
    ("just text", "base64 data URL"),
    ("data:image/png,rawbytes", "base64 encoded"),
    ("data:image/png;base64,@@@", "could not be decoded"),
    (data_url(b"hello"), "not a PNG, JPEG, GIF or WebP"),
    (data_url(PNG, "image/jpeg"), "declared as 'image/jpeg' but its bytes are image/png"),
    ("file://otherhost/a.png", "local file"),
])
def test_what_is_not_an_image_we_take_is_refused(url: str, says: str) -> None:
    assert says in refused(images.from_url, url, "p").message


def test_detail_takes_auto_low_high_and_nothing_else() -> None:
    for detail in ("auto", "low", "high"):
        assert images.from_url(data_url(PNG), "p", detail).detail == detail
    assert images.from_url(data_url(PNG), "p", None).detail == "auto"
    assert refused(images.from_url, data_url(PNG), "p", "ultra").param == "p.detail"


def test_anthropic_base64_source() -> None:
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}
    assert images.from_anthropic_source(source, "p") == ImageInput(PNG, "image/png")
    assert "never downloads" in refused(images.from_anthropic_source, {"type": "url", "url": "https://x/a.png"},
                                        "p").message
    assert "media_type" in refused(images.from_anthropic_source, {"type": "base64"}, "p").message
    assert "'file'" in refused(images.from_anthropic_source, {"type": "file", "file_id": "f"}, "p").message


def command(*messages: ChatMessage) -> Generate:
    return Generate("r", "m", SamplingParams(max_tokens=4), messages=messages)


def test_resolve_leaves_a_request_without_images_alone() -> None:
    plain = command(ChatMessage("user", "hi"))
    assert images.resolve(plain, 0, 0, None) is plain


def test_resolve_counts_the_images_of_every_message() -> None:
    one = ImageInput(PNG, "image/png")
    request = command(ChatMessage("user", "a", images=(one, one)), ChatMessage("user", "b", images=(one,)))
    assert images.resolve(request, 3, 1000, None) == request
    assert "at most 2 per request" in refused(images.resolve, request, 2, 1000, None).message


def test_resolve_refuses_an_image_over_the_size_limit() -> None:
    request = command(ChatMessage("user", "a", images=(ImageInput(PNG, "image/png"),)))
    error = refused(images.resolve, request, 8, len(PNG) - 1, None)
    assert "--max-image-bytes" in error.message and error.param == "messages[0]"


def file_request(path: Path) -> Generate:
    return command(ChatMessage("user", "a", images=(images.from_url(path.as_uri(), "p", "low"),)))


def test_a_file_url_is_read_only_under_the_image_dir(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(PNG)
    resolved = images.resolve(file_request(allowed / "a.png"), 8, 1000, allowed)
    assert resolved.messages is not None
    assert resolved.messages[0].images == (ImageInput(PNG, "image/png", detail="low"),)
    assert "without --image-dir" in refused(images.resolve, file_request(allowed / "a.png"), 8, 1000, None).message


def test_a_file_url_cannot_leave_the_image_dir(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    (allowed / "link.png").symlink_to(secret)
    for path in (secret, allowed / "link.png", allowed / ".." / "secret.png"):
        assert "--image-dir" in refused(images.resolve, file_request(path), 8, 1000, allowed).message


def test_a_file_url_that_is_missing_large_or_no_image_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(PNG + b"\x00" * 100)
    (tmp_path / "text.png").write_bytes(b"hello")
    (tmp_path / "folder").mkdir()
    assert "could not be read" in refused(images.resolve, file_request(tmp_path / "none.png"), 8, 1000,
                                          tmp_path).message
    assert "--max-image-bytes" in refused(images.resolve, file_request(tmp_path / "big.png"), 8, 100,
                                          tmp_path).message
    assert "not a PNG" in refused(images.resolve, file_request(tmp_path / "text.png"), 8, 1000, tmp_path).message
    assert "regular file" in refused(images.resolve, file_request(tmp_path / "folder"), 8, 1000, tmp_path).message


# -- the three APIs' image parts become the same engine message ------------------------------------------

def test_the_three_apis_give_the_engine_the_same_user_message() -> None:
    import msgspec

    from gateway.chat.convert import chat_to_generate
    from gateway.chat.wire import ChatCompletionRequest
    from gateway.messages.convert import chat_messages
    from gateway.messages.wire import MessageParam
    from gateway.responses.convert import input_messages

    expected = (ChatMessage("user", "what is it?", images=(ImageInput(PNG, "image/png"),)),)
    chat = msgspec.convert({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": data_url(PNG)}}]}]},
        ChatCompletionRequest)
    assert chat_to_generate(chat, "r", 16).messages == expected
    parts = [{"type": "input_text", "text": "what is it?"}, {"type": "input_image", "image_url": data_url(PNG)}]
    assert input_messages([{"role": "user", "content": parts}]) == expected
    message = msgspec.convert({"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(PNG).decode()}}]}, MessageParam)
    assert chat_messages(None, [message]) == expected


def test_images_outside_user_messages_are_refused_naming_the_part() -> None:
    import msgspec

    from gateway.messages.convert import chat_messages
    from gateway.messages.wire import MessageParam
    from gateway.responses.convert import input_messages

    with pytest.raises(GatewayError) as caught:
        input_messages([{"role": "assistant", "content": [{"type": "input_image", "image_url": data_url(PNG)}]}])
    assert caught.value.param == "input[0].content[0]"
    with pytest.raises(GatewayError) as caught:
        input_messages([{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}])
    assert caught.value.param == "input[0].content[0].file_id"
    assistant = msgspec.convert({"role": "assistant", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}, MessageParam)
    with pytest.raises(GatewayError) as caught:
        chat_messages(None, [MessageParam("user", "hi"), assistant])
    assert caught.value.param == "messages[1].content[0]"
