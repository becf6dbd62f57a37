"""Cross-cutting HTTP concerns of the shim: body-size limit, admin token, request metrics."""
from __future__ import annotations

import hmac
import time

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


def json_reply(status: int, message: str) -> Response:
    return JSONResponse(status_code=status, content={"error": message})


class Guards:
    """Pure ASGI middleware (BaseHTTPMiddleware hides client disconnects from the routes,
    and the shim aborts generations on disconnect): size limit, admin token, metrics."""

    def __init__(self, app, max_body_bytes: int, admin_token: str | None, metrics: ShimMetrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.admin_token = admin_token
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        refusal, receive = await self._check(scope, receive)
        if refusal is not None:
            await refusal(scope, receive, send_and_record)
        else:
            await self.app(scope, receive, send_and_record)
        route = getattr(scope.get("route"), "path", "unmatched")  # the template, never the raw path
        self.metrics.requests.labels(scope["method"], route, str(status_holder["status"])).inc()
        self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)

    async def _check(self, scope, receive):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return json_reply(413, f"request body of {length} bytes is over the limit of "
                                   f"{self.max_body_bytes} (SHIM_MAX_BODY_BYTES)"), receive
        if self.admin_token and (scope["method"], scope["path"]) in ADMIN_ROUTES:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.admin_token}".encode()):
                return json_reply(401, "this route needs Authorization: Bearer <SHIM_ADMIN_TOKEN>"), receive
        if scope["method"] == "POST" and length is None:
            # A chunked body has no length up front: read it here, bounded, then replay it.
            body = b""
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                if len(body) > self.max_body_bytes:
                    return json_reply(413, f"request body is over the limit of {self.max_body_bytes} bytes "
                                           "(SHIM_MAX_BODY_BYTES)"), receive
                if not message.get("more_body"):
                    break
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # later: the disconnect, as the route expects

            return None, replay
        return None, receive
