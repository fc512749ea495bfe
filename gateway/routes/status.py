"""GET /: the status page for a person (gateway/status_page.py renders it).

It needs the API key when one is set, like /v1/models: it names the models, their sizes and when they were
last used, which /v1/models also keeps behind the key (/health shows counts only). A browser cannot add a
Bearer header to a typed-in address, so this route also takes the key as an HTTP Basic password and its 401
asks for one: the browser shows its login prompt (any user name, the key as password).
"""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response, get

from gateway import security, status_page
from gateway.lifecycle import GatewayRuntime


@get("/", include_in_schema=False, media_type="text/html", opt=security.PAGE)
async def status(request: Request[Any, Any, Any]) -> Response[str]:
    runtime: GatewayRuntime = request.app.state.runtime
    data = status_page.PageData(
        health=runtime.health(),
        models=runtime.models().data,
        tokens_per_s=runtime.tokens_per_second(),
        watchdog=runtime.watchdog_status(),
        watchdog_configured=runtime.settings.watchdog_state_dir is not None,
        now=time.time(),
    )
    return Response(status_page.render(data), media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-store"})
