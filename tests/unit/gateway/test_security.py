"""The security seams' pure parts (Host matching, the default allow-list, JSON media types, keys, labels),
and which routes of the real app need the key (deny by default)."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import pytest
from litestar import Litestar

from gateway.app import create_app
from gateway.runtime import GatewayRuntime
from gateway.security import (
    LOOPBACK_HOSTS,
    HostPolicy,
    guards,
    is_json_media_type,
    key_matches,
    method_label,
    needs_key,
    presented_keys,
    split_host,
    warn_if_open,
)
from gateway.settings import Settings
from mlx_backend.client.fake import FakeEngine
from mlx_backend.registry import ModelRegistry
from tests.unit.gateway.conftest import ClientFactory

# -- Host


@pytest.mark.parametrize(("value", "parsed"), [
    ("localhost", ("localhost", None)), ("LocalHost:8080", ("localhost", 8080)), ("[::1]:11435", ("[::1]", 11435)),
    ("[::1]", ("[::1]", None)), ("127.0.0.1:1", ("127.0.0.1", 1)), ("localhost.", ("localhost", None)),
    (" example.com ", ("example.com", None)),
    ("", None), (":80", None), ("a:b", None), ("::1", None), ("[::1", None), ("[::1]x", None), ("a:\u0661", None),
])
def test_split_host(value: str, parsed: tuple[str, int | None] | None) -> None:
    assert split_host(value) == parsed


def test_loopback_bind_answers_loopback_names_only() -> None:
    for bind in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        assert HostPolicy.for_bind(bind).allowed == LOOPBACK_HOSTS
    policy = HostPolicy.for_bind("127.0.0.1")
    for host in ("localhost", "localhost:1", "127.0.0.1:11435", "[::1]:2", "app.localhost:3000", "a.b.localhost"):
        assert policy.allows(host), host
    for host in ("evil.example", "localhost.evil.example", ".localhost", "127.0.0.2", "[::2]", "", None,
                 "evil.example:11435", "caf\u00e9"):
        assert not policy.allows(host), host


def test_a_specific_address_adds_itself_and_a_wildcard_bind_answers_anything() -> None:
    assert HostPolicy.for_bind("192.168.1.5").allowed == (*LOOPBACK_HOSTS, "192.168.1.5")
    assert HostPolicy.for_bind("fe80::1").allows("[fe80::1]:11435")
    assert HostPolicy.for_bind("mybox.lan").allows("MyBox.lan:80")
    assert not HostPolicy.for_bind("192.168.1.5").allows("evil.example")
    for bind in ("0.0.0.0", "::"):
        assert HostPolicy.for_bind(bind).allowed is None
        assert HostPolicy.for_bind(bind).allows("anything.example")


def test_configured_hosts_replace_the_bound_address_but_keep_loopback() -> None:
    policy = HostPolicy.for_bind("0.0.0.0", ["api.example", "*.corp.example", "fixed.example:8443"])
    assert policy.allows("api.example:1") and policy.allows("x.corp.example") and policy.allows("localhost")
    assert policy.allows("fixed.example:8443") and not policy.allows("fixed.example:8444")
    assert not policy.allows("corp.example") and not policy.allows("evil.example")
    assert HostPolicy.for_bind("127.0.0.1", ["*"]).allowed is None


def test_the_refusal_names_the_host_the_list_and_the_setting() -> None:
    error = HostPolicy.for_bind("127.0.0.1").refusal("evil.example\u00e9")
    assert error.status == 400 and error.kind.value.code == "host_not_allowed"
    assert "evil.example\\xe9" in error.message and "localhost" in error.message
    assert "--allowed-host" in error.message and "MLX_GATEWAY_ALLOWED_HOSTS" in error.message


def test_a_wildcard_bind_without_a_list_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        warn_if_open(Settings(host="127.0.0.1"))
        warn_if_open(Settings(host="0.0.0.0", allowed_hosts=("api.example",)))
        assert caplog.text == ""
        warn_if_open(Settings(host="0.0.0.0"))
    assert "DNS rebinding" in caplog.text and "--allowed-host" in caplog.text


def test_settings_refuse_a_url_as_a_host() -> None:
    for entry in ("http://api.example", "api.example/v1", "", "a b"):
        with pytest.raises(ValueError, match="allowed_hosts"):
            Settings(allowed_hosts=(entry,)).check()
    Settings(allowed_hosts=("api.example", "*.example", "*", "[::1]:80")).check()


# -- JSON bodies


@pytest.mark.parametrize("value", ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                                   'application/json;charset="UTF-8"', "application/json; foo=bar",
                                   "application/vnd.api+json", "application/merge-patch+json"])
def test_json_media_types(value: str) -> None:
    assert is_json_media_type(value)


@pytest.mark.parametrize("value", [None, "", "text/plain", "text/plain; charset=utf-8", "multipart/form-data",
                                   "application/x-www-form-urlencoded", "text/json", "application/jsonp",
                                   "application/json; charset=iso-8859-1", "application/+json", "json",
                                   "application/\u00e9+json"])
def test_not_json_media_types(value: str | None) -> None:
    assert not is_json_media_type(value)


# -- keys


def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"headers": list(headers)}


def test_keys_come_from_bearer_and_x_api_key_as_bytes() -> None:
    assert presented_keys(scope((b"authorization", b"Bearer k1"), (b"x-api-key", b" k2 "))) == [b"k1", b"k2"]
    assert presented_keys(scope((b"authorization", b"bearer   k1"))) == [b"k1"]
    assert presented_keys(scope((b"authorization", b"Basic k1"), (b"cookie", b"k"))) == []


def test_key_matches_never_raises_on_odd_bytes() -> None:
    assert key_matches(scope((b"authorization", b"Bearer s3cret")), b"s3cret")
    assert key_matches(scope((b"x-api-key", b"wrong"), (b"x-api-key", b"s3cret")), b"s3cret")
    for odd in (b"Bearer caf\xc3\xa9", b"Bearer \xff", b"\xff Bearer", b"Bearer", b""):
        assert not key_matches(scope((b"authorization", odd)), b"s3cret")
    assert key_matches(scope((b"authorization", "Bearer caf\u00e9".encode())), "caf\u00e9".encode())


# -- metrics labels


def test_method_labels_are_a_fixed_set() -> None:
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        assert method_label(method) == method
    for method in ("get", "QWERTY", "PROPFIND", "TRACE", "CONNECT", ""):
        assert method_label(method) == "other"


# -- which routes need the key

PUBLIC_PATHS = {"/health", "/health/live", "/health/ready"}
METRICS_PATHS = {"/metrics"}
DOCS_PREFIXES = ("/docs", "/openapi.json")


def app_for(**settings: Any) -> Litestar:
    config = Settings(hf_cache=False, demo_model=False, **settings)
    return create_app(GatewayRuntime(config, FakeEngine(), ModelRegistry((), None, False)))


def test_every_route_needs_the_key_except_an_explicit_public_set() -> None:
    """Deny by default: a new route without `opt=PUBLIC` (or METRICS/DOCS) needs the key."""
    plain, protected = app_for(api_key="k"), app_for(api_key="k", protect_metrics=True, protect_docs=True)
    seen = set()
    for route in plain.routes:
        for handler in getattr(route, "route_handlers", []):
            path = route.path
            seen.add(path)
            if handler.http_methods == {"OPTIONS"}:  # Litestar's own: its layer's opt, else it needs the key
                assert needs_key(handler, protected.state.runtime.settings), path
                continue
            public = needs_key(handler, plain.state.runtime.settings) is False
            expected_public = path in PUBLIC_PATHS | METRICS_PATHS or path.startswith(DOCS_PREFIXES)
            assert public == expected_public, (path, handler)
            assert needs_key(handler, protected.state.runtime.settings) is (path not in PUBLIC_PATHS), path
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics", "/docs"} <= seen


def test_metrics_and_docs_are_public_unless_protected(make_client: ClientFactory) -> None:
    open_docs = make_client(api_key="k")
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert open_docs.get(path).status_code == 200, path
    closed = make_client(api_key="k", protect_metrics=True, protect_docs=True)
    for path in ("/metrics", "/docs", "/docs/openapi.json", "/openapi.json"):
        assert closed.get(path).status_code == 401, path
        assert closed.get(path, headers={"x-api-key": "k"}).status_code == 200, path
    assert closed.get("/health").status_code == 200


def test_the_checks_run_on_the_event_loop_as_one_guard() -> None:
    """Litestar runs a sync guard in a worker thread, and copies the route handler for each guard, per
    request: the checks are one async guard (the order of refusals is the tests' above)."""
    checks = guards(Settings(hf_cache=False, demo_model=False, api_key="k"))
    assert len(checks) == 1 and inspect.iscoroutinefunction(checks[0])
