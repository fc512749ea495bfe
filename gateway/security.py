"""The security seams, inside Litestar on the routed request: Host allow-list, API key, JSON bodies.

They are app-level guards, so they run after routing on the matched handler (the path Litestar routed,
not the raw one: `//v1/...` is `/v1/...` here) and before the body is read. Their errors go through the
app's exception handlers, inside Litestar's CORS middleware, so a browser can read them.

Deny by default: every route needs the API key when one is set, so a new route (an admin API, a status
page, another API's endpoints) is covered without a thought. A route opts out in its decorator:
`@get("/x", opt=security.PUBLIC)` never needs the key; `opt=security.METRICS` / `opt=security.DOCS` are
public unless `protect_metrics` / `protect_docs`; `opt=security.PAGE` needs the key but also takes it as
the password of HTTP Basic auth, and its 401 asks for that, so a browser prompts for it (a person cannot
add a Bearer header to an address typed in). A Router's `opt` covers its routes. Unmatched paths answer
404 before any guard runs.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from gateway.errors import ErrorKind, GatewayError
from gateway.settings import Settings, is_loopback_host

log = logging.getLogger("mlx_gateway")


class Access(enum.Enum):
    KEY = "key"  # the default: needs the API key when one is set
    PUBLIC = "public"
    METRICS = "metrics"
    DOCS = "docs"
    PAGE = "page"  # a page for a browser: the key, also as a Basic-auth password


OPT_KEY = "access"
PUBLIC: Mapping[str, Any] = MappingProxyType({OPT_KEY: Access.PUBLIC})
METRICS: Mapping[str, Any] = MappingProxyType({OPT_KEY: Access.METRICS})
DOCS: Mapping[str, Any] = MappingProxyType({OPT_KEY: Access.DOCS})
PAGE: Mapping[str, Any] = MappingProxyType({OPT_KEY: Access.PAGE})
BASIC_CHALLENGE = 'Basic realm="mlx-gateway", charset="UTF-8"'

# `*.localhost` too: the TLD is reserved (RFC 6761 §6.3), nobody can register one and point it at us, and
# browsers resolve it to loopback themselves; so no rebinding attacker can send it.
LOOPBACK_HOSTS = ("localhost", "*.localhost", "127.0.0.1", "[::1]")
_WILDCARD_BINDS = ("0.0.0.0", "::", "")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9!#$&^_.-][a-z0-9!#$&^_.+-]*\+)?json")  # RFC 6838 names


# -- Host


def split_host(value: str) -> tuple[str, int | None] | None:
    """`name[:port]` from a Host header or an allow-list entry, lower-cased; None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):  # IPv6 literal, [::1]:port
        end = value.find("]")
        name, rest = value[:end + 1], value[end + 1:]
        if end < 0 or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        name, sep, port_text = value.rpartition(":")
        if not sep:
            name, port_text = value, ""
        port = port_text if sep else None
        if ":" in name:
            return None
    if port is not None and not (port.isascii() and port.isdigit()):
        return None
    name = name.rstrip(".")  # `localhost.` is the same name
    if not name:
        return None
    return name, int(port) if port is not None else None


def _matches(entry: tuple[str, int | None], host: tuple[str, int | None]) -> bool:
    name, port = entry
    if port is not None and port != host[1]:
        return False
    if name.startswith("*."):
        return host[0].endswith(name[1:]) and len(host[0]) > len(name) - 1
    return name == host[0]


def _address_host(bind: str) -> str:
    try:
        return f"[{bind}]" if ipaddress.ip_address(bind).version == 6 else bind
    except ValueError:
        return bind  # a host name


@dataclass(frozen=True)
class HostPolicy:
    """Which Host headers are answered; `allowed is None` means any (no DNS-rebinding protection)."""

    allowed: tuple[str, ...] | None

    @classmethod
    def for_bind(cls, bind: str, configured: Sequence[str] = ()) -> HostPolicy:
        """Configured names plus loopback names; unconfigured: loopback names, and the bound address
        unless it is a wildcard, which answers to any host (the operator is told at start)."""
        if "*" in configured:
            return cls(None)
        if configured:
            return cls(_unique([*LOOPBACK_HOSTS, *configured]))
        if bind in _WILDCARD_BINDS:
            return cls(None)
        if is_loopback_host(bind):
            return cls(LOOPBACK_HOSTS)
        return cls(_unique([*LOOPBACK_HOSTS, _address_host(bind)]))

    @functools.cached_property
    def _entries(self) -> list[tuple[str, int | None]]:
        return [e for e in map(split_host, self.allowed or ()) if e is not None]

    def allows(self, value: str | None) -> bool:
        if self.allowed is None:
            return True
        host = split_host(value or "")  # no Host: HTTP/1.1 says 400 (RFC 9112 3.2)
        return host is not None and any(_matches(e, host) for e in self._entries)

    def refusal(self, value: str) -> GatewayError:
        shown = f"Host '{ascii(value)[1:-1][:100]}' is not allowed" if value else "A Host header is required"
        names = ", ".join(self.allowed or ())
        return GatewayError(
            ErrorKind.HOST_NOT_ALLOWED,
            f"{shown} (this server answers to {names}). This guards "
            "against DNS rebinding; to allow another name, set allowed_hosts (--allowed-host NAME, or "
            "MLX_GATEWAY_ALLOWED_HOSTS=name1,name2; '*' allows any).",
        )


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip().lower() for n in names))


# -- API key


def _header_values(scope: Any, name: bytes) -> list[bytes]:
    return [value for key, value in scope["headers"] if key.lower() == name]


def presented_keys(scope: Any, basic: bool = False) -> list[bytes]:
    """The keys a request offers: `Authorization: Bearer KEY` (OpenAI) and `x-api-key: KEY` (Anthropic);
    with `basic`, also the password of `Authorization: Basic base64(user:KEY)` (any user name).

    Raw bytes: a header may hold any byte, and comparing bytes never raises."""
    keys = []
    for value in _header_values(scope, b"authorization"):
        scheme, _, key = value.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            keys.append(key.strip())
        elif basic and scheme.lower() == b"basic":
            try:
                keys.append(base64.b64decode(key.strip(), validate=True).partition(b":")[2])
            except (binascii.Error, ValueError):
                continue
    keys += [value.strip() for value in _header_values(scope, b"x-api-key")]
    return keys


def key_matches(scope: Any, api_key: bytes, basic: bool = False) -> bool:
    # Every candidate is compared (no early exit), in constant time each.
    return sum(hmac.compare_digest(key, api_key) for key in presented_keys(scope, basic)) > 0


def needs_key(handler: BaseRouteHandler, settings: Settings) -> bool:
    access = handler.opt.get(OPT_KEY, Access.KEY)
    if access is Access.PUBLIC:
        return False
    if access is Access.METRICS:
        return settings.protect_metrics
    if access is Access.DOCS:
        return settings.protect_docs
    return True


# -- JSON bodies


def is_json_media_type(value: str | None) -> bool:
    """`application/json` or `application/<x>+json` (RFC 6839), charset absent or UTF-8 (RFC 8259).

    None of these is a CORS-safelisted type, so a browser must preflight them: no blind cross-site POST."""
    if not value:
        return False
    media, *params = value.split(";")
    if not _JSON_MEDIA_TYPE.fullmatch(media.strip().lower()):
        return False
    for param in params:
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def _unsupported_media_type(value: str | None) -> GatewayError:
    got = f"'{ascii(value)[1:-1][:100]}'" if value else "none"
    return GatewayError(ErrorKind.UNSUPPORTED_MEDIA_TYPE,
                        f"Unsupported Content-Type {got}: send the body as JSON with "
                        "'Content-Type: application/json'.")


# -- the guards


def guards(settings: Settings) -> list[Guard]:
    """In order: a wrong Host is refused before anything, then the key, then the body's type."""
    hosts = HostPolicy.for_bind(settings.host, settings.allowed_hosts)
    api_key = settings.api_key.encode() if settings.api_key else None

    def check_host(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        host = connection.headers.get("host")
        if not hosts.allows(host):
            raise hosts.refusal(host or "")

    def check_api_key(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if api_key is None or not needs_key(handler, settings):
            return
        page = handler.opt.get(OPT_KEY) is Access.PAGE
        if not key_matches(connection.scope, api_key, basic=page):
            if page:
                raise GatewayError(ErrorKind.UNAUTHORIZED, "This page needs the API key: give it as the password "
                                   "(any user name).", challenge=BASIC_CHALLENGE)
            raise GatewayError(ErrorKind.UNAUTHORIZED, "Missing or invalid API key: send "
                               "'Authorization: Bearer <key>' (or 'x-api-key: <key>').")

    def check_json_body(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if connection.scope.get("method") in _BODY_METHODS:
            content_type = connection.headers.get("content-type")
            if not is_json_media_type(content_type):
                raise _unsupported_media_type(content_type)

    async def check(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        # One async guard: Litestar runs a sync guard in a worker thread and copies the handler for each
        # guard, per request (three thread hops and copies on every admission).
        check_host(connection, handler)
        check_api_key(connection, handler)
        check_json_body(connection, handler)

    return [check]


def warn_if_open(settings: Settings) -> None:
    """Say it at start when any Host is answered: DNS rebinding is then possible."""
    if HostPolicy.for_bind(settings.host, settings.allowed_hosts).allowed is None:
        why = "allowed_hosts is '*'" if "*" in settings.allowed_hosts else f"bound to {settings.host or '*'}"
        log.warning("answering requests for any Host header (%s): a web page can reach this server through "
                    "DNS rebinding. Restrict it with --allowed-host NAME (repeatable) or "
                    "MLX_GATEWAY_ALLOWED_HOSTS=name1,name2", why)


# -- metrics labels

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """A bounded label: any method a client invents is 'other', not a new series."""
    return method if method in HTTP_METHODS else "other"
