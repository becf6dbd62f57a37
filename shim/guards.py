"""Cross-cutting HTTP concerns of the shim, as pure ASGI middleware (BaseHTTPMiddleware
hides client disconnects from the routes, and the shim aborts generations on disconnect):
the body-size limit and read deadline, the admin token (or, without one, loopback only),
the drain's refusal of new work and its count of requests in flight, and request metrics.

Every response is counted in `llm_shim_requests_total`, labelled with the route template
(never the raw path) even when the guard itself refuses the request, and 5xx included: an
exception that escapes a route is answered here as a JSON 500 and counted. A response is
counted once, before its last body chunk is sent.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time

from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.routing import Match

from .drain import RETRY_AFTER_S, Drain
from .errors import OPENAI_ROUTES, error

log = logging.getLogger("shim.guards")

ADMIN_ROUTES = {("POST", "/system_prompt")}
# Answered while draining, and not counted as work in flight: what probes and scrapers ask.
OBSERVING_ROUTES = {("GET", "/"), ("GET", "/health/live"), ("GET", "/health/ready"), ("GET", "/metrics"),
                    ("GET", "/info")}


class ShimMetrics:
    """The shim's own figures, on its /metrics (Triton's are on Triton's metrics port)."""

    def __init__(self):
        self.registry = CollectorRegistry()

        def made(kind, name: str, text: str, labels: tuple[str, ...] = (), **more):
            return kind(name, text, list(labels), registry=self.registry, **more)

        self.requests = made(Counter, "llm_shim_requests_total", "HTTP requests by route and status",
                             ("method", "route", "status"))
        self.latency = made(Histogram, "llm_shim_request_seconds", "HTTP request latency by route", ("method", "route"),
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 360))
        self.model_failures = made(Counter, "llm_shim_model_failures_total",
                                   "Failed model calls counted toward restarting a dead tritonserver")
        self.queued_tokens = made(Gauge, "llm_shim_queued_tokens",
                                  "Tokens of work admitted and not yet answered (SHIM_MAX_QUEUED_TOKENS bounds it)")
        self.engine_fallback = made(Gauge, "llm_engine_fallback",
                                    "1 while transformers serves because vLLM could not (see /info engine_fallback)")
        self.server_restarts = made(Counter, "llm_shim_server_restarts_total",
                                    "tritonserver restarts asked by the shim (every request failing)")

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def route_template(routes, scope) -> str:
    """The path template of the route `scope` would reach ("unmatched" if none)."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return getattr(route, "path", "unmatched")
    return "unmatched"


def from_loopback(scope) -> bool:
    """Whether the peer is this host: 127.0.0.0/8, ::1 (IPv4-mapped too), or a Unix socket."""
    client = scope.get("client")
    if not client:
        return True  # a Unix socket: only this host can connect
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


# A refusal that leaves the request's body unread ends the connection with its answer: the
# connection cannot carry another request, and left open, a client that keeps sending holds it
# (each byte it sends cancels the server's keep-alive timer; nothing else bounds it).
CLOSE = {"Connection": "close"}


class BodyRefused(Exception):
    def __init__(self, status: int, message: str | None):
        self.status, self.message = status, message


def bearer_matches(headers: dict[str, str], secret: str) -> bool:
    """Whether the request carries `Authorization: Bearer <secret>`, compared in constant time."""
    return hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {secret}".encode())


class Guards:
    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, admin_token: str | None,
                 metrics: ShimMetrics, routes, drain: Drain | None = None, api_key: str | None = None):
        self.app = app
        self.drain = drain or Drain()
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.admin_token = admin_token
        self.api_key = api_key  # SHIM_API_KEY: required on /v1 when set
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        route = route_template(self.routes, scope)
        status = {"code": None}
        counted = False

        def count(code: str) -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.requests.labels(scope["method"], route, code).inc()
                self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted before the last byte goes out: a client that scrapes /metrics once it
                # has its response always finds that response counted.
                count(str(status["code"]))
            await send(message)

        working = (scope["method"], scope["path"]) not in OBSERVING_ROUTES
        if working:
            self.drain.in_flight += 1
        try:
            refusal, receive = await self._check(scope, receive, working)
            if refusal is not None:
                refusal.headers.update(CLOSE)  # answered before any body was read
                await refusal(scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        except BodyRefused as exc:
            if exc.message is None:  # the client went away mid-body: nobody to answer
                status["code"] = 499
            else:
                await error(exc.status, exc.message, CLOSE, path=scope["path"])(scope, receive, send_and_record)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], route)
            if status["code"] is None:
                await error(500, "internal error in the shim", path=scope["path"])(scope, receive, send_and_record)
            status["code"] = status["code"] or 500
        finally:
            count(str(status["code"] or 499))  # no response started: the client left first
            if working:
                self.drain.in_flight -= 1

    async def _check(self, scope, receive, working: bool):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if working and self.drain.draining:
            return error(503, "the server is shutting down; send this request to another replica",
                         {"Retry-After": str(RETRY_AFTER_S)}, path=scope["path"]), receive
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return error(413, f"request body of {length} bytes is over the limit of "
                              f"{self.max_body_bytes} (SHIM_MAX_BODY_BYTES)", path=scope["path"]), receive
        if self.api_key and scope["path"].startswith(OPENAI_ROUTES):
            if not bearer_matches(headers, self.api_key):
                why = "no API key given" if not headers.get("authorization") else "the API key is not this server's"
                return error(401, f"{why}: send Authorization: Bearer <SHIM_API_KEY>", path=scope["path"],
                             code="invalid_api_key"), receive
        if (scope["method"], scope["path"]) in ADMIN_ROUTES:
            if self.admin_token:
                if not bearer_matches(headers, self.admin_token):
                    return error(401, "this route needs Authorization: Bearer <SHIM_ADMIN_TOKEN>"), receive
            elif not from_loopback(scope):
                return error(403, "this route answers only on this host while SHIM_ADMIN_TOKEN is not set; "
                                  "set it to change the server from elsewhere"), receive
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None, receive
        body = await self._read_body(receive)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: the disconnect, which the route watches for

        return None, replay

    async def _read_body(self, receive) -> bytes:
        """The whole body, bounded in size and in time (a client that sends less than its
        Content-Length must not hold a connection open), before any route sees it."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyRefused(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                       "(SHIM_BODY_TIMEOUT_S)") from None
            if message["type"] == "http.disconnect":
                raise BodyRefused(499, None)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyRefused(413, f"request body is over the limit of {self.max_body_bytes} bytes "
                                       "(SHIM_MAX_BODY_BYTES)")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)
