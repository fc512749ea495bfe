"""`mlx-gateway models`: list a running server's models, and load, unload, pin or unpin one (the admin API).

Talks HTTP to a running server (stdlib only, no proxy): `--url` or MLX_GATEWAY_URL, `--api-key` or
MLX_GATEWAY_API_KEY (the same variable the server reads, so on the server's own machine it just works).
Exit codes: 0 done, 1 the server refused (its error message is printed), 2 usage, 3 no answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:11435"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy: it is local
ACTIONS = ("load", "unload", "pin", "unpin")


class ServerError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-gateway models", description="List a running server's models, or load, unload, pin, unpin one.",
        epilog="examples: mlx-gateway models | mlx-gateway models load org/name | mlx-gateway models pin org/name",
    )
    parser.add_argument("action", nargs="?", choices=("list", *ACTIONS), default="list")
    parser.add_argument("model", nargs="?", help="model id, as the list shows it")
    parser.add_argument("--url", default=os.environ.get("MLX_GATEWAY_URL", DEFAULT_URL),
                        help="the server (env MLX_GATEWAY_URL; default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("MLX_GATEWAY_API_KEY"),
                        help="its API key, if it has one (env MLX_GATEWAY_API_KEY)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for an answer (a load answers when the model is ready)")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer")
    return parser


def call(url: str, api_key: str | None, method: str, path: str, body: dict[str, Any] | None,
         timeout: float) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode(errors="replace")[:300] or exc.reason
        raise ServerError(exc.code, str(message)) from None


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.action != "list" and not args.model:
        parser.error(f"'{args.action}' needs a model id")
    started = time.monotonic()
    try:
        if args.action == "list":
            answer = call(args.url, args.api_key, "GET", "/v1/models", None, args.timeout)
        else:
            answer = call(args.url, args.api_key, "POST", f"/admin/models/{args.action}", {"model": args.model},
                          args.timeout)
    except ServerError as exc:
        print(f"mlx-gateway models: {exc.status}: {exc}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"mlx-gateway models: no answer from {args.url} ({reason})", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.action == "list":
        print(table(answer.get("data", []), time.time()))
    else:
        print(f"{args.action} {args.model}: done in {time.monotonic() - started:.1f}s; now {describe(answer)}")
    return 0


def describe(model: dict[str, Any]) -> str:
    status = str(model.get("status", "?"))
    return status + (", pinned" if model.get("pinned") else "")


def table(models: list[dict[str, Any]], now: float) -> str:
    rows = [("MODEL", "STATUS", "SIZE", "PINNED", "RUNNING", "LAST USE", "UNLOADS")]
    for m in models:
        expires = m.get("expires_at")
        if m.get("status") != "loaded":
            unloads = "-"
        elif m.get("pinned"):
            unloads = "never"
        elif expires is None:
            unloads = "in use" if m.get("requests_running") else "never"
        else:
            unloads = "in " + _span(max(0.0, expires - now))
        last = m.get("last_used_at")
        status = str(m.get("status", "?"))
        progress = m.get("progress")
        if status == "loading" and progress and progress.get("bytes_total"):
            status += f" {progress['bytes_read'] / progress['bytes_total']:.0%}"
        rows.append((
            str(m.get("id")), status, _size(int(m.get("size_bytes") or 0)), "yes" if m.get("pinned") else "",
            str(m.get("requests_running") or 0), _span(now - last) + " ago" if last else "-", unloads,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f}G" if n >= 10**9 else f"{n / 1e6:.0f}M" if n >= 10**6 else f"{n / 1e3:.0f}k"


def _span(seconds: float) -> str:
    s = int(seconds)
    return f"{s}s" if s < 90 else f"{round(s / 60)}m" if s < 5400 else f"{s / 3600:.1f}h"
