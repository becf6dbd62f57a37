"""Text at the door: lone surrogates anywhere in a body, replies rendered off the loop,
errors renumbered to the request's rows, and a failed chunk ending its siblings."""
from __future__ import annotations

import asyncio

import pytest
from fastapi.responses import JSONResponse
from hypothesis import given, settings, strategies as st

from shim.bodies import JSON_MAX_DEPTH, PredictRequest, decode_body, json_problem
from shim.ensemble import first_failure_ends_all, renumber_prompt
from shim.errors import ApiError
from shim.render import render_json

# Any code point, with lone surrogates (category Cs, 2,048 of 1.1 million) drawn often.
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
                   | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=12)
json_like = st.recursive(st.none() | st.booleans() | st.integers() | any_text,
                         lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children,
                                                                                           max_size=4),
                         max_leaves=25)


def has_surrogate(node) -> bool:
    if isinstance(node, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in node)
    if isinstance(node, list):
        return any(map(has_surrogate, node))
    if isinstance(node, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in node.items())
    return False


@settings(max_examples=400, deadline=None)
@given(json_like)
def test_a_lone_surrogate_anywhere_is_found_and_its_place_named_in_utf8(data):
    problem = json_problem(data, JSON_MAX_DEPTH)
    assert (problem is not None) == has_surrogate(data)
    if problem is not None:
        assert "lone surrogate" in problem
        problem.encode("utf-8")  # the message itself is always sendable


def test_the_named_place_is_the_field_path():
    # A bad key on the path is named escaped: the message itself must be sendable.
    assert json_problem({"\ud800": "\udfff"}, 32) == "\\ud800 is not valid UTF-8 text (a lone surrogate)"
    assert json_problem({"a": {"\udc00": 1}}, 32) == "a.\\udc00 (a key) is not valid UTF-8 text (a lone surrogate)"
    assert json_problem({"messages": [{"content": "ok"}, {"content": "a\ud800"}]}, 32) == \
        "messages[1].content is not valid UTF-8 text (a lone surrogate)"
    with pytest.raises(ApiError) as caught:
        decode_body(b'{"prompt": ["ok", "\\udfff"]}', PredictRequest)
    assert caught.value.status == 400 and caught.value.message.startswith("prompt[1] ")


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=10),
                    lambda children: st.lists(children, max_size=40) | st.dictionaries(st.text(max_size=5), children,
                                                                                        max_size=5),
                    max_leaves=200))
def test_render_json_makes_the_bytes_jsonresponse_makes(payload):
    assert render_json(payload) == JSONResponse(payload).body


def test_row_numbers_of_a_chunk_become_the_request_rows():
    assert renumber_prompt("prompt 188 has 2001 tokens; the model length is 1024", 512) == \
        "prompt 700 has 2001 tokens; the model length is 1024"
    assert renumber_prompt("prompt 3: temperature must be in [0, 2]", 0) == "prompt 3: temperature must be in [0, 2]"
    assert renumber_prompt("the generator engine is unavailable; prompt 3", 512).endswith("prompt 3")


def test_the_first_failure_cancels_the_other_calls():
    cancelled = []

    async def slow(k):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(k)
            raise

    async def failing():
        await asyncio.sleep(0)
        raise ApiError(400, "prompt 0: bad")

    async def run():
        return await first_failure_ends_all([slow(0), failing(), slow(2)])

    with pytest.raises(ApiError, match="prompt 0: bad"):
        asyncio.run(run())
    assert sorted(cancelled) == [0, 2]

    async def fine(k):
        return [k]

    assert asyncio.run(first_failure_ends_all([fine(0), fine(1)])) == [[0], [1]]
