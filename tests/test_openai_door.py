"""The OpenAI door's errors and access, read through the official `openai` package: OpenAI's
error shape and classes, a 404 for a model this server does not serve, the optional API key
(a second shim attached to the session's Triton, with SHIM_API_KEY set), and streams that
proxies pass through (no caching or buffering, keep-alive comments while silent)."""
from __future__ import annotations

import json
import sys
import time

import httpx
import openai
import psutil
import pytest

from .conftest import TINY_MODEL, TINY_MODEL_LEN, free_port, start_server, stop_server

pytestmark = pytest.mark.server
API_KEY = "test-key-" + "x" * 24


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def keyed(server):
    """A shim with an API key and a 0.5 s keep-alive, attached to the session's tritonserver."""
    env = {**server.env, "PORT": str(free_port()), "SHIM_API_KEY": API_KEY, "SHIM_SSE_KEEPALIVE_S": "0.5",
           "TRITON_URL": f"http://{server.triton_url}",
           "TRITON_GRPC_URL": f"grpc://127.0.0.1:{server.env['TRITON_GRPC_PORT']}"}
    shim = start_server(env, "keyed-shim.log", [sys.executable, "-m", "shim.serve"])
    yield shim
    stop_server(shim)


def test_models_shows_the_model_length(server):
    models = server.get("/v1/models")[1]["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [(TINY_MODEL.name, TINY_MODEL_LEN)]


def test_bad_input_is_a_400_in_openais_shape(client):
    with pytest.raises(openai.BadRequestError) as refused:  # a value of the wrong type: 400, not 422
        client.chat.completions.create(model=TINY_MODEL.name, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"max_tokens": "4"})
    assert refused.value.status_code == 400
    error = refused.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens", error
    assert error["message"].startswith("max_tokens:"), error
    with pytest.raises(openai.BadRequestError) as refused:  # a field this server does not implement
        client.completions.create(model=TINY_MODEL.name, prompt="x", max_tokens=1, extra_body={"echo": True})
    assert refused.value.body["param"] == "echo" and "does not implement" in refused.value.body["message"]


def test_max_tokens_over_the_limit_is_a_400_naming_it(client):
    from preprocess.contract import MAX_NEW_TOKENS_LIMIT

    within = client.chat.completions.create(model=TINY_MODEL.name, messages=[{"role": "user", "content": "x"}],
                                            max_completion_tokens=3)
    assert within.usage.completion_tokens == 3  # max_completion_tokens is the limit, as max_tokens is
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=TINY_MODEL.name, messages=[{"role": "user", "content": "x"}],
                                           **{field: MAX_NEW_TOKENS_LIMIT + 1})
        assert str(MAX_NEW_TOKENS_LIMIT) in caught.value.body["message"] and caught.value.body["param"] == field


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    assert TINY_MODEL.name in missing.value.body["message"]
    reply = client.chat.completions.create(model=TINY_MODEL.name, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=1)
    assert reply.model == TINY_MODEL.name


def test_the_api_key_guards_v1_only(keyed):
    base = keyed.url + "/v1"
    ask = dict(model=TINY_MODEL.name, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    for key in ("", "wrong-" + API_KEY):
        with pytest.raises(openai.AuthenticationError) as denied:
            openai.OpenAI(base_url=base, api_key=key or "x", max_retries=0, timeout=60,
                          default_headers={} if key else {"Authorization": ""}).chat.completions.create(**ask)
        assert denied.value.status_code == 401 and denied.value.body["code"] == "invalid_api_key"
    reply = openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0, timeout=60).chat.completions.create(**ask)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens == 1
    # The judge's routes stay open: the judge sends no key.
    assert keyed.post("/predict", {"prompt": "hi", "max_new_tokens": 1})[0] == 200
    assert keyed.get("/")[0] == 200


def test_a_stream_is_neither_cached_nor_buffered_and_keeps_alive_while_silent(keyed):
    """The generator and its engine are paused (SIGSTOP) for 3 s mid-stream: the shim sends
    comment lines (SHIM_SSE_KEEPALIVE_S=0.5 on this shim) until the pieces come again, and the
    stream ends whole."""
    state = keyed.generator_state()
    paused_processes = [psutil.Process(state["pid"]), psutil.Process(state["engine_pid"])]
    body = {"model": TINY_MODEL.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
            "stream": True, "stream_options": {"include_usage": True}}
    lines = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", keyed.url + "/v1/chat/completions", json=body, headers=headers, timeout=120) as reply:
        assert reply.status_code == 200
        assert reply.headers["cache-control"] == "no-store" and reply.headers["x-accel-buffering"] == "no"
        paused = False
        for line in reply.iter_lines():
            lines.append(line)
            if not paused and line.startswith("data: {"):  # the first piece: pause the engine's front end
                paused = True
                for process in paused_processes:
                    process.suspend()
                try:
                    time.sleep(3)  # how long the stream stays silent; the verdict reads the lines
                finally:
                    for process in paused_processes:
                        process.resume()
    lines = [line for line in lines if line]  # the blank lines between events
    keepalives = [line for line in lines if line.startswith(": keep-alive")]
    assert keepalives, lines[:5]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]" and data[-1]["usage"]["completion_tokens"] >= 1, lines[-3:]
    assert not any("error" in d for d in data), data


def test_content_as_text_parts_is_the_same_conversation_as_text(client, tokenizer):
    """Chat UIs send content as an array of parts: text parts join with newlines, into the
    same prompt as the joined string; another part type is a 400 naming it."""
    parts = [{"type": "text", "text": "What is a warp?"}, {"type": "text", "text": "One line, please."}]
    as_parts = client.chat.completions.create(model=TINY_MODEL.name, messages=[{"role": "user", "content": parts}],
                                              max_tokens=2, extra_body={"return_token_ids": True})
    as_text = client.chat.completions.create(
        model=TINY_MODEL.name, messages=[{"role": "user", "content": "What is a warp?\nOne line, please."}],
        max_tokens=2, extra_body={"return_token_ids": True})
    assert as_parts.model_extra["prompt_token_ids"] == as_text.model_extra["prompt_token_ids"]
    assert "One line, please." in tokenizer.decode(as_parts.model_extra["prompt_token_ids"])
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=TINY_MODEL.name, max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert refused.value.body["param"] == "messages[0].content[1].type"
    assert "'image_url' parts are not served here" in refused.value.body["message"]
