"""The shim's request figures, read at the moment the client receives its response's end."""
import asyncio

import pytest
from starlette.routing import Route

from shim.guards import Guards, ShimMetrics


def counted(metrics: ShimMetrics, status: str) -> float:
    return metrics.registry.get_sample_value(
        "llm_shim_requests_total", {"method": "POST", "route": "/predict", "status": status}) or 0.0


def observed(metrics: ShimMetrics) -> float:
    return metrics.registry.get_sample_value(
        "llm_shim_request_seconds_count", {"method": "POST", "route": "/predict"}) or 0.0


def serve_once(app, messages_seen: list, metrics: ShimMetrics):
    """Run one POST /predict through Guards; `send` records the figures as each message arrives."""
    guards = Guards(app, max_body_bytes=1000, body_timeout_s=5, admin_token=None, metrics=metrics,
                    routes=[Route("/predict", lambda request: None, methods=["POST"])])
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [], "query_string": b""}
    bodies = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        return bodies.pop(0) if bodies else {"type": "http.disconnect"}

    async def send(message):
        messages_seen.append((message["type"], message.get("more_body", False), counted(metrics, "200"),
                              observed(metrics)))

    asyncio.run(guards(scope, receive, send))


def answer_in(chunks: int):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for k in range(chunks):
            await send({"type": "http.response.body", "body": b"x", "more_body": k < chunks - 1})
    return app


@pytest.mark.parametrize("chunks", [1, 3])
def test_a_response_is_counted_before_its_last_chunk_reaches_the_client(chunks):
    metrics, seen = ShimMetrics(), []
    serve_once(answer_in(chunks), seen, metrics)
    *earlier, last = seen
    assert last == ("http.response.body", False, 1.0, 1.0)  # both figures in place for the end
    assert all(c == 0.0 and s == 0.0 for _, _, c, s in earlier)  # not before: latency covers the answer
    assert counted(metrics, "200") == 1.0 and observed(metrics) == 1.0  # and only once


def test_a_request_with_no_response_is_counted_as_499():
    async def silent(scope, receive, send):
        await receive()

    metrics = ShimMetrics()
    serve_once(silent, [], metrics)
    assert counted(metrics, "499") == 1.0 and observed(metrics) == 1.0


def admin_post(client: tuple | None, admin_token: str | None = None, authorization: str | None = None) -> int:
    """The status a POST /system_prompt from `client` (host, port) gets from the guards."""
    statuses = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guards = Guards(app, max_body_bytes=1000, body_timeout_s=5, admin_token=admin_token, metrics=ShimMetrics(),
                    routes=[Route("/system_prompt", lambda request: None, methods=["POST"])])
    headers = [(b"authorization", authorization.encode())] if authorization else []
    scope = {"type": "http", "method": "POST", "path": "/system_prompt", "headers": headers, "query_string": b"",
             "client": client}

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    asyncio.run(guards(scope, receive, send))
    return statuses[0]


@pytest.mark.parametrize("client, status", [
    (("127.0.0.1", 5000), 200), (("127.8.9.10", 5000), 200), (("::1", 5000), 200), (("::ffff:127.0.0.1", 5), 200),
    (None, 200),  # a Unix socket
    (("203.0.113.7", 5000), 403), (("10.0.0.2", 5000), 403), (("::ffff:198.51.100.1", 5), 403),
    (("testclient", 50000), 403),  # not an address: not known to be this host
])
def test_without_an_admin_token_admin_routes_answer_only_this_host(client, status):
    assert admin_post(client) == status


def test_with_an_admin_token_the_token_decides_wherever_the_client_is():
    assert admin_post(("203.0.113.7", 5000), "tok") == 401
    assert admin_post(("203.0.113.7", 5000), "tok", "Bearer tok") == 200
    assert admin_post(("127.0.0.1", 5000), "tok") == 401
