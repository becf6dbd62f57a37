"""Token streaming through the decoupled `llm_stream` ensemble, against the real server
(tiny model: it says " GPU" at every greedy step and never stops before max_tokens)."""
from __future__ import annotations

import json
import socket
import time

import numpy as np
import openai
import pytest

from .conftest import TINY_ANSWER, over_replicas, scrape_metrics, wait_for

pytestmark = pytest.mark.server

QUESTION = [{"role": "user", "content": "What is a GPU?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def stream_figures(server) -> dict[str, float]:
    figures = over_replicas(scrape_metrics(server.metrics_url))
    return {key: value for key, value in figures.items()
            if key.startswith(("llm_generator_streams_total", "llm_generator_generation_tokens_total"))}


def test_a_streamed_chat_comes_in_pieces_and_equals_the_whole_answer(client):
    settings = dict(model="any", messages=QUESTION, max_tokens=12, temperature=0, extra_body={"raw": True})
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # not one chunk after the fact: the tokens came as they were made
    assert "".join(pieces) == whole.choices[0].message.content == TINY_ANSWER * 12
    assert chunks[0].choices[0].delta.role == "assistant"
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert ends == ["length"] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_a_streamed_completion_is_verbatim_and_carries_logprobs(client):
    settings = dict(model="any", prompt="The answer is", max_tokens=5, temperature=0, logprobs=3)
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(**settings, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed_tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed_tokens == whole.choices[0].logprobs.tokens and len(streamed_tokens) == 5
    assert all(len(c.choices[0].logprobs.top_logprobs[0]) == 3 for c in chunks if c.choices[0].logprobs)


def test_a_client_that_leaves_mid_stream_has_its_generation_aborted(server):
    """The first piece arrives, the client hangs up, and the engine stops well short of
    max_tokens: so that piece came before the last token was made, and the stream's end
    is counted as cancelled (aborted in vLLM), not finished."""
    max_tokens = 900  # the tiny model's length is 1024; generating all of it takes seconds
    before = stream_figures(server)
    body = json.dumps({"messages": QUESTION, "max_tokens": max_tokens, "stream": True, "raw": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b'"content"' not in received:
            chunk = conn.recv(4096)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"text/event-stream" in received
    key = 'llm_generator_streams_total{outcome=cancelled}'
    assert wait_for(lambda: stream_figures(server).get(key, 0) > before.get(key, 0), 30), stream_figures(server)
    after = stream_figures(server)
    generated = (after["llm_generator_generation_tokens_total"] - before["llm_generator_generation_tokens_total"])
    assert 1 <= generated < max_tokens
    assert after.get('llm_generator_streams_total{outcome=finished}', 0) == \
        before.get('llm_generator_streams_total{outcome=finished}', 0)
    assert server.post("/predict", {"prompt": "next one"})[0] == 200


@pytest.mark.parametrize("body, named", [
    ({"messages": QUESTION, "stream": True, "n": 2}, "n=2"),
    ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": QUESTION, "stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    ({"messages": QUESTION, "stream": True, "return_token_ids": True}, "return_token_ids"),
])
def test_what_a_stream_cannot_do_is_refused_by_name(server, body, named):
    status, reply = server.post("/v1/chat/completions", body)
    assert 400 <= status < 500 and named in json.dumps(reply), reply


def test_a_refusal_before_the_first_token_is_an_http_error(server):
    """The engine refuses a prompt longer than the model: a 400 naming it, not a 200 stream."""
    status, reply = server.post("/v1/completions", {"prompt": "GPU " * 1100, "max_tokens": 1, "stream": True})
    assert status == 400 and "model length" in reply["error"], reply


def test_tritonclient_streams_the_ensemble_over_grpc(server):
    """The documented way for Triton's own clients: gRPC streaming to llm_stream."""
    import queue

    import tritonclient.grpc as triton_grpc

    responses: queue.Queue = queue.Queue()
    grpc_url = f"127.0.0.1:{server.env['TRITON_GRPC_PORT']}"
    client = triton_grpc.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        inputs = []
        for name, value, dtype in (("prompt", np.array([[b"What is a GPU?"]], dtype=np.object_), "BYTES"),
                                   ("max_new_tokens", np.array([[4]], dtype=np.int32), "INT32")):
            tensor = triton_grpc.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        client.async_stream_infer("llm_stream", inputs)
        texts, reason = [], ""
        deadline = time.monotonic() + 60
        while not reason and time.monotonic() < deadline:
            result, error = responses.get(timeout=60)
            assert error is None, error
            texts.append(result.as_numpy("text").reshape(-1)[0].decode())
            reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
    finally:
        client.stop_stream()
        client.close()
    assert reason == "length" and len(texts) >= 2 and "".join(texts) == TINY_ANSWER * 4
