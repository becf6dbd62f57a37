"""Thinking as `reasoning_content` on /v1 chat (the session server runs REASONING_PARSER=think),
read with the official `openai` package, whole and streamed.

The tiny model never thinks by itself, so a JSON schema whose one value holds a thinking
block makes it write one: real generated tokens, the tags cut across them as the
tokenizer cuts them, through preprocess, the generator, postprocess and the stream."""
from __future__ import annotations

import openai
import pytest

from .conftest import TINY_ANSWER, TINY_MODEL

pytestmark = pytest.mark.server

THOUGHT, ANSWER = "plan it", "Paris"
FORCED = {"type": "json_schema", "json_schema": {"name": "t", "schema": {
    "type": "string", "enum": [f"<think>{THOUGHT}</think>{ANSWER}"]}}}
QUESTION = [{"role": "user", "content": "Where?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_thinking_comes_back_apart_from_the_answer(client):
    reply = client.chat.completions.create(model=TINY_MODEL.name, messages=QUESTION, max_tokens=40,
                                           response_format=FORCED)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop"
    assert message.model_extra["reasoning_content"] == THOUGHT
    assert message.content == f'"{ANSWER}"'  # the JSON string's quotes are the answer's


def test_a_stream_sends_the_thinking_as_reasoning_deltas(client):
    stream = client.chat.completions.create(model=TINY_MODEL.name, messages=QUESTION, max_tokens=40,
                                            response_format=FORCED, stream=True)
    thought, content = [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        thought.append((delta.model_extra or {}).get("reasoning_content") or "")
        content.append(delta.content or "")
        assert "<think>" not in content[-1] and "</think>" not in thought[-1] + content[-1]
    assert ("".join(thought), "".join(content)) == (THOUGHT, f'"{ANSWER}"')


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_without_thinking_is_all_content(client, stream):
    reply = client.chat.completions.create(model=TINY_MODEL.name, messages=QUESTION, max_tokens=3, stream=stream)
    if not stream:
        message = reply.choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == (None, (TINY_ANSWER * 3).strip())
        return
    deltas = [chunk.choices[0].delta for chunk in reply]
    assert "".join(d.content or "" for d in deltas) == TINY_ANSWER * 3
    assert not any((d.model_extra or {}).get("reasoning_content") for d in deltas)

