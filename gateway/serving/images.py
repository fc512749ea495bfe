"""Image parts of the three APIs -> the engine's `ImageInput`, with every refusal a clear 400.

Where an image may come from (decided once, here, for chat, Responses and Messages alike):
- a base64 `data:` URL (OpenAI's `image_url.url`, Responses' `input_image.image_url`), or Anthropic's
  `source: {"type": "base64", "media_type", "data"}`;
- a local file, `file:///abs/path`, only under the folder `--image-dir` names (symlinks resolved first, so a
  link cannot lead out of it); without `--image-dir` every `file://` image is refused. A server bound to a
  network address must not read arbitrary files for whoever can reach it.
- never an `http(s)` URL: the gateway runs offline by design and fetches nothing on a client's behalf (no
  server-side request forgery, no hanging on someone else's server). Such an image is a 400 saying so.

Only PNG, JPEG, GIF (first frame) and WebP are taken, recognised by their bytes (a wrong declared type is
refused). Count and size limits (`--max-images`, `--max-image-bytes`) are checked in `resolve`, which every
generation route calls before the request goes to the engine. `detail` is accepted: "low" shows the model
the image shrunk to fit 512x512 pixels (fewer image tokens, as OpenAI's low detail); "high" and "auto" show it
at the resolution the model's own processor picks. Whether the model takes images at all is the engine's
call (a text-only model answers 400 `images_not_supported`, naming it).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec

from gateway.errors import ErrorKind, GatewayError
from mlx_backend.contract import ChatMessage, Generate, ImageInput

MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
DETAILS = ("auto", "low", "high")


def refused(param: str, message: str) -> GatewayError:
    return GatewayError(ErrorKind.INVALID_IMAGE, message, param)


def from_url(url: str, param: str, detail: str | None = "auto") -> ImageInput:
    """An OpenAI image URL: a base64 data URL, or a file:// URL (read later, by `resolve`)."""
    detail = _detail(detail, param)
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise refused(param, "Image URLs are not fetched: this server runs offline and never downloads anything "
                             "for a request. Send the image inline as a base64 data URL "
                             "('data:image/png;base64,...').")
    if scheme == "data":
        return _from_data_url(url, param, detail)
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise refused(param, "A file:// image URL must name a local file (file:///path).")
        return ImageInput(b"", "", path=unquote(parts.path), detail=detail)
    raise refused(param, "An image must be a base64 data URL ('data:image/png;base64,...') or, where the server "
                         "allows it, a file:// URL.")


def from_anthropic_source(source: dict[str, Any], param: str) -> ImageInput:
    """An Anthropic image block's `source`: base64 (and a url source is refused like any URL)."""
    kind = source.get("type")
    if kind == "base64":
        data, media_type = source.get("data"), source.get("media_type")
        if not isinstance(data, str) or not isinstance(media_type, str):
            raise refused(param, "A base64 image source needs 'media_type' and 'data' (strings).")
        return _checked(_b64decode(data, param), media_type, param, "auto")
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str):
            raise refused(param, "A url image source needs 'url' (a string).")
        return from_url(url, param)
    raise refused(param, f"Image source type {kind!r} is not available; send 'base64'.")


def resolve(command: Generate, max_images: int, max_bytes: int, image_dir: Path | None) -> Generate:
    """The request with its images counted, read (file:// ones) and size-checked; unchanged without images."""
    messages = command.messages
    if not messages or not any(m.images for m in messages):
        return command
    count = sum(len(m.images) for m in messages)
    if count > max_images:
        raise refused("messages", f"The request has {count} images; this server takes at most {max_images} per "
                                  "request (--max-images).")
    resolved: list[ChatMessage] = []
    for index, message in enumerate(messages):
        images = tuple(_resolved(image, f"messages[{index}]", max_bytes, image_dir) for image in message.images)
        resolved.append(msgspec.structs.replace(message, images=images) if images else message)
    return msgspec.structs.replace(command, messages=tuple(resolved))


def _resolved(image: ImageInput, param: str, max_bytes: int, image_dir: Path | None) -> ImageInput:
    if image.path is not None:
        return _checked(_read_file(image.path, param, max_bytes, image_dir), None, param, image.detail)
    if len(image.data) > max_bytes:
        raise refused(param, f"An image is {len(image.data)} bytes; this server takes images of at most "
                             f"{max_bytes} bytes (--max-image-bytes).")
    return image


def _read_file(path: str, param: str, max_bytes: int, image_dir: Path | None) -> bytes:
    if image_dir is None:
        raise refused(param, "file:// images are not allowed on this server (it was started without --image-dir); "
                             "send the image as a base64 data URL.")
    root = image_dir.resolve()
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(root):
        raise refused(param, "file:// images must be files under the server's image folder (--image-dir).")
    try:
        size = target.stat().st_size
        if not target.is_file():
            raise refused(param, "The file:// image is not a regular file.")
        if size > max_bytes:
            raise refused(param, f"An image is {size} bytes; this server takes images of at most {max_bytes} "
                                 "bytes (--max-image-bytes).")
        return target.read_bytes()
    except OSError as exc:
        raise refused(param, f"The file:// image could not be read ({exc.strerror or type(exc).__name__}).") from None


def _from_data_url(url: str, param: str, detail: str) -> ImageInput:
    head, comma, payload = url.partition(",")
    if not comma or not head.lower().endswith(";base64"):
        raise refused(param, "An image data URL must be base64 encoded ('data:image/png;base64,...').")
    media_type = head[len("data:"):-len(";base64")].strip().lower()
    return _checked(_b64decode(payload, param), media_type, param, detail)


def _b64decode(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise refused(param, "The image's base64 data could not be decoded.") from None


def _checked(data: bytes, declared: str | None, param: str, detail: str) -> ImageInput:
    """The image if its bytes are one of the formats taken, and the declared type (if any) says the same."""
    found = sniff(data)
    if found is None:
        raise refused(param, "The image is not a PNG, JPEG, GIF or WebP image (its bytes say otherwise).")
    if declared is not None and declared.lower() != found and declared.lower() not in ("image/jpg", "image/*", ""):
        raise refused(param, f"The image is declared as {declared!r} but its bytes are {found}.")
    return ImageInput(data, found, detail=detail)


def sniff(data: bytes) -> str | None:
    """The media type the file's first bytes name, among those taken."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _detail(detail: str | None, param: str) -> str:
    detail = detail or "auto"
    if detail not in DETAILS:
        raise refused(f"{param}.detail", f"detail must be one of {', '.join(DETAILS)}, not {detail!r}.")
    return detail
