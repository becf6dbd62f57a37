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
