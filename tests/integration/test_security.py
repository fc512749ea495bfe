"""The security seams against a real server: the key on every spelling of a path, the Host allow-list
(DNS rebinding), JSON-only bodies (blind cross-site POSTs), CORS with a key, odd header bytes, and
bounded metrics labels.

Raw sockets where a client library would tidy the request up (`//v1`, non-ASCII header bytes, no Host).
"""

from __future__ import annotations

import json
import random
import socket
import string
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.support.server import ServerProcess

KEY = "s3cret"
ORIGIN = "http://app.example"
CHAT = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
JSON = (b"Content-Type", b"application/json")
BEARER = (b"Authorization", b"Bearer " + KEY.encode())


def _server(models_dir: Path, log: Path, *args: str) -> Iterator[ServerProcess]:
    server = ServerProcess(["--models-dir", str(models_dir), *args], log).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keyed(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An API key, a CORS origin, /metrics protected, and one extra allowed host name."""
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    yield from _server(models_dir, log, "--api-key", KEY, "--cors-origin", ORIGIN, "--protect-metrics",
                       "--allowed-host", "gateway.lan")


@pytest.fixture(scope="module")
def plain(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The defaults: loopback, no key."""
    yield from _server(models_dir, tmp_path_factory.mktemp("plain") / "server.log")


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if self.headers.get("transfer-encoding") == "chunked":
            body = _dechunk(body)
        self.body = body

    def error(self) -> dict[str, object]:
        error = json.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        return error  # type: ignore[no-any-return]


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def raw(server: ServerProcess, method: bytes, target: bytes, *headers: tuple[bytes, bytes], body: bytes = b"",
        host: bytes | None = b"127.0.0.1") -> Answer:
    """One HTTP/1.1 request exactly as written: no normalisation of the path or the header bytes."""
    url = urlsplit(server.base_url)
    lines = [method + b" " + target + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [name + b": " + value for name, value in headers]
    lines += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return Answer(data)


# -- the key, on the routed path


SPELLINGS = [
    (b"POST", b"//v1/chat/completions"), (b"POST", b"/v1//chat/completions"), (b"POST", b"/v1/chat/completions/"),
    (b"POST", b"///v1///completions"), (b"GET", b"//v1/models"), (b"GET", b"/v1/models/"),
    (b"GET", b"/%76%31/models"), (b"GET", b"//v1//models//tiny"), (b"GET", b"/v1/models?x=/health"),
]


@pytest.mark.parametrize(("method", "target"), SPELLINGS, ids=[t.decode() for _, t in SPELLINGS])
def test_no_spelling_of_a_path_answers_without_the_key(keyed: ServerProcess, method: bytes, target: bytes) -> None:
    body = CHAT if method == b"POST" else b""
    with_key = raw(keyed, method, target, BEARER, JSON, body=body)
    without = raw(keyed, method, target, JSON, body=body)
    if with_key.status != 404:  # routed: then the key is what stands in the way
        assert without.status == 401, (with_key.status, without.body)
        assert without.error()["code"] == "invalid_api_key"
        assert without.headers["www-authenticate"] == "Bearer"
    else:
        assert without.status in (401, 404)


def test_the_double_slash_chat_route_is_served_with_the_key(keyed: ServerProcess) -> None:
    assert raw(keyed, b"POST", b"//v1/chat/completions", BEARER, JSON, body=CHAT).status == 200


def test_health_is_public_docs_public_metrics_protected(keyed: ServerProcess) -> None:
    for path in ("/health", "/health/live", "/health/ready", "/docs", "/openapi.json"):
        assert httpx.get(keyed.base_url + path, timeout=10).status_code == 200, path
    assert httpx.get(keyed.base_url + "/metrics", timeout=10).status_code == 401  # --protect-metrics
    metrics = httpx.get(keyed.base_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert metrics.status_code == 200 and "mlx_gateway_http_requests_total" in metrics.text


def test_anthropic_style_x_api_key_is_a_key(keyed: ServerProcess) -> None:
    url = keyed.base_url + "/v1/models"
    assert httpx.get(url, headers={"x-api-key": KEY}, timeout=10).status_code == 200
    assert httpx.get(url, headers={"x-api-key": "wrong"}, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Basic " + KEY}, timeout=10).status_code == 401


def test_the_openai_sdk_with_the_key_works_and_without_it_gets_authentication_error(keyed: ServerProcess) -> None:
    with openai.OpenAI(base_url=keyed.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2)
        assert reply.object == "chat.completion"
    with openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="wrong", max_retries=0) as client, \
            pytest.raises(openai.AuthenticationError):
        client.models.list()


@pytest.mark.parametrize("value", [b"Bearer caf\xc3\xa9", b"Bearer \xff\xfe\xfd", b"Bearer s3cr\xe9t",
                                   b"\xc3\xa9 " + KEY.encode(), b"Bearer " + KEY.encode() + b"\x80"])
def test_a_non_ascii_authorization_is_401_not_500(keyed: ServerProcess, value: bytes) -> None:
    answer = raw(keyed, b"GET", b"/v1/models", (b"Authorization", value))
    assert answer.status == 401 and answer.error()["type"] == "authentication_error"
    answer = raw(keyed, b"GET", b"/v1/models", (b"x-api-key", value))
    assert answer.status == 401


def test_unmatched_paths_are_404_without_the_key(keyed: ServerProcess) -> None:
    answer = raw(keyed, b"GET", b"/nowhere")
    assert answer.status == 404 and answer.error()["code"] == "not_found"


# -- Host (DNS rebinding)


@pytest.mark.parametrize("host", [b"evil.example", b"evil.example:11435", b"localhost.evil.example",
                                  b"127.0.0.1.evil.example", b"gateway.lan", b"[::2]:80", b"127.0.0.1:x"])
def test_a_foreign_host_is_refused_on_loopback(plain: ServerProcess, host: bytes) -> None:
    for method, path, body in ((b"GET", b"/v1/models", b""), (b"POST", b"/v1/chat/completions", CHAT),
                               (b"GET", b"/health", b"")):
        answer = raw(plain, method, path, JSON, body=body, host=host)
        assert answer.status == 400, (path, answer.body)
        error = answer.error()
        assert error["code"] == "host_not_allowed" and "allowed_hosts" in str(error["message"])


@pytest.mark.parametrize("host", [b"localhost", b"LOCALHOST:8080", b"127.0.0.1", b"127.0.0.1:1", b"[::1]",
                                  b"[::1]:11435", b"app.localhost:3000", b"localhost."])
def test_loopback_names_are_answered_on_any_port(plain: ServerProcess, host: bytes) -> None:
    assert raw(plain, b"GET", b"/v1/models", host=host).status == 200


@pytest.mark.parametrize("host", [None, b""])
def test_a_request_without_a_host_is_400(plain: ServerProcess, host: bytes | None) -> None:
    answer = raw(plain, b"GET", b"/v1/models", host=host)  # HTTP/1.1 requires one (RFC 9112 3.2)
    assert answer.status == 400 and "A Host header is required" in str(answer.error()["message"])


def test_configured_hosts_are_added_to_the_loopback_names(keyed: ServerProcess) -> None:
    assert raw(keyed, b"GET", b"/v1/models", BEARER, host=b"gateway.lan:9000").status == 200
    assert raw(keyed, b"GET", b"/v1/models", BEARER, host=b"localhost").status == 200
    answer = raw(keyed, b"GET", b"/v1/models", BEARER, host=b"evil.example")
    assert answer.status == 400 and "gateway.lan" in str(answer.error()["message"])


def test_a_wildcard_bind_answers_any_host_and_warns_at_start(models_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    for server in _server(models_dir, log, "--host", "0.0.0.0", "--allow-public"):
        assert raw(server, b"GET", b"/v1/models", host=b"evil.example").status == 200
        assert "DNS rebinding" in server.log() and "--allowed-host" in server.log()


# -- JSON bodies only (blind cross-site POSTs)


@pytest.mark.parametrize("content_type", [None, b"text/plain", b"text/plain;charset=UTF-8",
                                          b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x",
                                          b"application/json; charset=latin-1", b"text/json", b"application/jsonx",
                                          b"application/\xc3\xa9+json", b"\xff\xfe"])
def test_a_post_without_a_json_content_type_is_415(plain: ServerProcess, content_type: bytes | None) -> None:
    headers = [(b"Content-Type", content_type)] if content_type is not None else []
    answer = raw(plain, b"POST", b"/v1/chat/completions", *headers, body=CHAT)
    assert answer.status == 415, answer.body
    error = answer.error()
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in str(error["message"])


@pytest.mark.parametrize("content_type", [b"application/json", b"application/json; charset=utf-8",
                                          b"Application/JSON;Charset=\"UTF-8\"", b"application/vnd.api+json"])
def test_json_content_types_are_accepted(plain: ServerProcess, content_type: bytes) -> None:
    assert raw(plain, b"POST", b"/v1/chat/completions", (b"Content-Type", content_type), body=CHAT).status == 200


def test_httpx_json_and_curl_with_the_header_pass_curl_without_it_does_not(plain: ServerProcess) -> None:
    url = plain.base_url + "/v1/chat/completions"
    assert httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 1}, timeout=60).status_code == 200

    def curl(*args: str) -> str:
        return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *args, url, "-d",
                               CHAT.decode()], capture_output=True, text=True, timeout=60, check=True).stdout

    assert curl("-H", "Content-Type: application/json") == "200"
    assert curl() == "415"  # curl -d sends application/x-www-form-urlencoded


# -- CORS with a key


def test_a_preflight_from_an_allowed_origin_needs_no_key(keyed: ServerProcess) -> None:
    answer = raw(keyed, b"OPTIONS", b"/v1/chat/completions", (b"Origin", ORIGIN.encode()),
                 (b"Access-Control-Request-Method", b"POST"),
                 (b"Access-Control-Request-Headers", b"authorization, content-type"))
    assert answer.status == 204
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in answer.headers["access-control-allow-methods"]


@pytest.mark.parametrize(("method", "target", "headers", "status"), [
    (b"POST", b"/v1/chat/completions", [JSON], 401),
    (b"POST", b"/v1/chat/completions", [BEARER, (b"Content-Type", b"text/plain")], 415),
    (b"GET", b"/nowhere", [], 404),
    (b"POST", b"/v1/chat/completions", [BEARER, JSON], 400),  # the body is not a chat request
])
def test_errors_carry_the_cors_headers(keyed: ServerProcess, method: bytes, target: bytes,
                                       headers: list[tuple[bytes, bytes]], status: int) -> None:
    answer = raw(keyed, method, target, (b"Origin", ORIGIN.encode()), *headers, body=b"{}")
    assert answer.status == status
    assert answer.headers.get("access-control-allow-origin") == ORIGIN, answer.headers
    answer.error()


# -- odd bytes in any header


@pytest.mark.parametrize("name", [b"Authorization", b"X-Api-Key", b"X-Request-Id", b"Content-Type", b"Host",
                                  b"Origin", b"Accept", b"Accept-Encoding", b"Cookie", b"User-Agent", b"X-Other"])
def test_odd_header_bytes_are_never_a_500(keyed: ServerProcess, plain: ServerProcess, name: bytes) -> None:
    for value in (b"\xff\xfe", b"caf\xc3\xa9", b"\x80" * 300, b"a\x7fb", "\u00e9".encode("latin-1")):
        for server in (keyed, plain):
            headers = {BEARER[0]: BEARER[1], JSON[0]: JSON[1], name: value}
            host = headers.pop(b"Host", b"127.0.0.1")
            answer = raw(server, b"POST", b"/v1/chat/completions", *headers.items(), body=CHAT, host=host)
            assert answer.status < 500, (name, value, answer.status, answer.body)


# -- metrics labels


def _series(server: ServerProcess, key: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(server.base_url + "/metrics", headers=headers, timeout=10).text
    return [line for line in text.splitlines() if line.startswith("mlx_gateway_http_requests_total{")]


def test_a_thousand_invented_methods_leave_the_series_bounded(plain: ServerProcess) -> None:
    rng = random.Random(15)
    methods = ["".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12))) for _ in range(1000)]
    with httpx.Client(base_url=plain.base_url, timeout=10) as client:
        for i, method in enumerate(methods):
            client.request(method, rng.choice(["/v1/models", "/health", f"/nowhere/{i}"]))
    series = _series(plain)
    labels = {line.split('method="', 1)[1].split('"', 1)[0] for line in series}
    assert labels <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, labels
    assert "other" in labels
    assert len(series) < 40, series
    assert not any("/nowhere/" in line for line in series)
