"""Cross-cutting HTTP concerns of the shim: body-size limit, admin token, request metrics."""
from __future__ import annotations

import hmac
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ADMIN_ROUTES = {("POST", "/system_prompt")}


class ShimMetrics:
    """The shim's own figures, on its /metrics (Triton's are on Triton's metrics port)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("llm_shim_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("llm_shim_request_seconds", "HTTP request latency by route", ["method", "route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 360),
                                 registry=self.registry)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def route_label(request: Request) -> str:
    """The route template, never the raw path (unbounded label values would grow forever)."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def install_guards(app, max_body_bytes: int, admin_token: str | None, metrics: ShimMetrics) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        response = await _guarded(request, call_next)
        label = route_label(request)
        metrics.requests.labels(request.method, label, str(response.status_code)).inc()
        metrics.latency.labels(request.method, label).observe(time.perf_counter() - started)
        return response

    async def _guarded(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return JSONResponse(status_code=413, content={
                "error": f"request body of {length} bytes is over the limit of {max_body_bytes} (SHIM_MAX_BODY_BYTES)"})
        if admin_token and (request.method, request.url.path) in ADMIN_ROUTES:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {admin_token}".encode()):
                return JSONResponse(status_code=401, content={"error": "this route needs Authorization: Bearer <SHIM_ADMIN_TOKEN>"})
        if request.method == "POST" and length is None:
            # A chunked body has no length up front: read it with the same limit.
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    return JSONResponse(status_code=413, content={
                        "error": f"request body is over the limit of {max_body_bytes} bytes (SHIM_MAX_BODY_BYTES)"})
            request._body = body  # starlette reuses it for request.body()
        return await call_next(request)
