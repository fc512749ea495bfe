"""Health for the watchdog and load balancers, metrics for Prometheus, and the status page. Never blocked by
generation.

The status page (`GET /`, gateway/health/status_page.py renders it) needs the API key when one is set, like
/v1/models: it names the models, their sizes and when they were last used, which /v1/models also keeps behind
the key (/health shows counts only). A browser cannot add a
Bearer header to a typed-in address, so this route also takes the key as an HTTP Basic password and its 401
asks for one: the browser shows its login prompt (any user name, the key as password).
"""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response, get
from litestar.openapi import ResponseSpec

from gateway import metrics, security
from gateway.health import status_page
from gateway.health.wire import Health, Liveness
from gateway.runtime import GatewayRuntime


@get("/health", operation_id="health", summary="Status, readiness and model counts", tags=["Operations"],
     responses={503: ResponseSpec(Health, description="Not ready: the body says why")}, opt=security.PUBLIC)
async def health(request: Request[Any, Any, Any]) -> Response[Health]:
    runtime: GatewayRuntime = request.app.state.runtime
    report = runtime.health.report()
    headers = {} if report.ready else {"Retry-After": "2"}
    return Response(report, status_code=200 if report.ready else 503, headers=headers)


@get("/health/live", operation_id="liveness", tags=["Operations"], opt=security.PUBLIC,
     summary="The process answers and its engine has not been given up on",
     responses={503: ResponseSpec(Liveness, description="The engine failed past its restart budget")})
async def liveness(request: Request[Any, Any, Any]) -> Response[Liveness]:
    runtime: GatewayRuntime = request.app.state.runtime
    if runtime.health.alive():
        return Response(Liveness())
    return Response(Liveness(status="engine_down"), status_code=503)


@get("/health/ready", operation_id="readiness", summary="200 when generation requests are accepted",
     tags=["Operations"], responses={503: ResponseSpec(Health, description="Not ready: the body says why")},
     opt=security.PUBLIC)
async def readiness(request: Request[Any, Any, Any]) -> Response[Health]:
    return await health.fn(request)  # type: ignore[no-any-return]


@get("/metrics", operation_id="metrics", summary="Prometheus text exposition", tags=["Operations"],
     media_type="text/plain", opt=security.METRICS)
async def prometheus_metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime: GatewayRuntime = request.app.state.runtime
    runtime.health.refresh_gauges()
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@get("/", include_in_schema=False, media_type="text/html", opt=security.PAGE)
async def status(request: Request[Any, Any, Any]) -> Response[str]:
    runtime: GatewayRuntime = request.app.state.runtime
    data = status_page.PageData(
        health=runtime.health.report(),
        models=runtime.catalog.models().data,
        tokens_per_s=runtime.health.tokens_per_second(),
        watchdog=runtime.health.watchdog_status(),
        watchdog_configured=runtime.settings.watchdog_state_dir is not None,
        now=time.time(),
    )
    return Response(status_page.render(data), media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-store"})
