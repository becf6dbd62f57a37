"""The OpenAI-compatible door, driven by the official openai client."""
from __future__ import annotations

import openai
import pytest
from .conftest import TINY_ANSWER, TINY_MODEL, error_text

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client, tiny_model):
    assert [m.id for m in client.models.list().data] == [tiny_model.name]


def test_chat_completion_with_usage(client):
    reply = client.chat.completions.create(
        model=TINY_MODEL.name, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is HBM?"}],
        max_tokens=4)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_n_4_returns_4_choices(client):
    reply = client.chat.completions.create(model=TINY_MODEL.name, messages=[{"role": "user", "content": "hi"}],
                                           n=4, max_tokens=3, temperature=0.8)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert 4 <= reply.usage.completion_tokens <= 12  # at least one token per choice, at most 3


def test_streamed_reply_comes_as_server_sent_events(client):
    stream = client.chat.completions.create(model=TINY_MODEL.name, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, stream=True)
    chunks = list(stream)
    assert chunks and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_with_a_list_and_n(client):
    reply = client.completions.create(model=TINY_MODEL.name, prompt=["a", "b"], n=2, max_tokens=2)
    # The tiny model never ends early: each choice is exactly its two tokens.
    assert [c.text for c in reply.choices] == [TINY_ANSWER * 2] * 4 and reply.usage.completion_tokens == 8


def test_raw_flag_skips_routing_and_clean_up(server):
    status, body = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                        "max_tokens": 2, "raw": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert body["choices"][0]["message"]["content"] == TINY_ANSWER * 2  # unclean: the leading space stays


def test_bad_openai_input_is_a_400_naming_the_field(server):
    """OpenAI's status for bad input on /v1 is 400, never 422, with the field in `param`."""
    for body, param in (({"messages": []}, "messages"),
                        ({"messages": [{"role": "system", "content": "s"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "x"}], "n": 99}, "n")):
        status, reply = server.post("/v1/chat/completions", body)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error", reply
        assert reply["error"]["param"] == param, reply


@pytest.mark.parametrize("field, value", [("functions", []), ("logit_bias", {"1": 1}), ("function_call", "auto"),
                                          ("echo", True)])
def test_an_unsupported_field_is_a_400_naming_it(server, field, value):
    """Never silently ignored: the client would believe it was applied."""
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/completions", {"prompt": "x"})):
        status, reply = server.post(path, {**body, "max_tokens": 1, field: value})
        assert status == 400 and error_text(reply) == f"unsupported field {field}: this server does not implement it"
    status, reply = server.post("/v1/completions", {"prompt": "x", "tools": [], "logit_bias": {}})
    assert status == 400 and "tools, logit_bias" in error_text(reply)  # tools are a chat feature
    assert server.post("/v1/completions", {"prompt": "x", "max_tokens": 1, "user": "u-1"})[0] == 200
