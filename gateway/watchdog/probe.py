"""HTTP probes with the stdlib: liveness decides restarts, /health is only logged."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

# No proxies: a corporate HTTP_PROXY must never stand between the watchdog and loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout_s: float) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=timeout_s) as response:
            return int(response.status), response.read(64 * 1024)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(64 * 1024)


def live(base_url: str, timeout_s: float) -> bool:
    """True when /health/live answers 200 within the timeout."""
    try:
        status, _ = _get(base_url.rstrip("/") + "/health/live", timeout_s)
    except (OSError, ValueError, http.client.HTTPException):  # refused, reset, timed out, garbled
        return False
    return status == 200


def health(base_url: str, timeout_s: float) -> tuple[int | None, dict[str, object] | None]:
    """(HTTP status, JSON body) of /health; (None, None) when it did not answer."""
    try:
        status, body = _get(base_url.rstrip("/") + "/health", timeout_s)
    except (OSError, ValueError, http.client.HTTPException):
        return None, None
    try:
        data = json.loads(body)
    except ValueError:
        return status, None
    return status, data if isinstance(data, dict) else None
