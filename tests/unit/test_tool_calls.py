"""What tools and tool_choice ask of the engine, and the calls read back: forced calls parse
against the tool's schema whatever the model wrote within the grammar; auto calls are read by
vLLM's own hermes parser."""
from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings, strategies as st

from shim.errors import ApiError
from shim.tools import AutoParser, plan

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": CITY}},
         {"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}}}]


def test_named_forces_the_functions_arguments():
    named = plan(TOOLS, {"type": "function", "function": {"name": "weather"}}, None)
    assert named.response_format()["json_schema"]["schema"] == CITY
    content, calls, finish = named.read('{"city": "Paris"}', "stop")
    assert content is None and finish == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.builds(lambda c: {"name": "weather", "parameters": {"city": c}}, st.text()),
                          st.just({"name": "clock", "parameters": {}})), min_size=1, max_size=3))
def test_required_reads_every_call_the_schema_admits(calls):
    required = plan(TOOLS, "required", None)
    schema = required.response_format()["json_schema"]["schema"]
    text = json.dumps(calls)
    jsonschema.validate(calls, schema)  # what the grammar lets the model write
    _, read, finish = required.read(text, "stop")
    assert finish == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in read] == [
        (c["name"], c["parameters"]) for c in calls]


def test_a_wrong_call_is_outside_the_required_schema():
    schema = plan(TOOLS, "required", None).response_format()["json_schema"]["schema"]
    for wrong in ([], [{"name": "other", "parameters": {}}], [{"name": "weather", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_parallel_tool_calls_false_allows_one_call():
    schema = plan(TOOLS, "required", None, parallel_tool_calls=False).response_format()["json_schema"]["schema"]
    jsonschema.validate([{"name": "clock", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "clock", "parameters": {}}] * 2, schema)


def test_a_forced_call_cut_by_the_token_limit_comes_back_as_text():
    assert plan(TOOLS, "required", None).read('[{"name": "wea', "length") == ('[{"name": "wea', [], "length")
    assert plan(TOOLS, "required", None).read('[{"nom": 1}]', "stop") == ('[{"nom": 1}]', [], "stop")


@pytest.mark.parametrize("tools, choice, response_format, problem", [
    (None, "required", None, "tool_choice: needs tools"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, None, "names no declared tool"),
    (TOOLS, "sometimes", None, "tool_choice must be"),
    (TOOLS, "required", {"type": "json_object"}, "response_format: cannot be combined"),
    (TOOLS + TOOLS[:1], "auto", None, "two tools have the same name"),
])
def test_a_bad_tool_request_is_a_400_naming_the_field(tools, choice, response_format, problem):
    with pytest.raises(ApiError) as caught:
        plan(tools, choice, response_format)
    assert caught.value.status == 400 and problem in caught.value.message


def test_none_and_no_tools_leave_the_text_alone():
    for nothing in (plan(None, None, None), plan(TOOLS, "none", None)):
        assert nothing.response_format() is None and not nothing.calls_expected
        assert nothing.read("<tool_call>{}</tool_call>", "stop") == ("<tool_call>{}</tool_call>", [], "stop")


def test_auto_reads_calls_with_vllms_hermes_parser(tokenizer):
    auto = plan(TOOLS, None, None)
    assert auto.mode == "auto" and auto.response_format() is None
    parser = AutoParser("hermes", tokenizer, auto.tools)
    text = 'Let me look.<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls, finish = auto.read(text, "stop", parser)
    assert content == "Let me look." and finish == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("weather", {"city": "Rome"})]
    assert auto.read("Sunny, I think.", "stop", parser) == ("Sunny, I think.", [], "stop")


def test_an_unknown_parser_is_a_501_naming_it(tokenizer):
    for use in ("load", "extract"):
        with pytest.raises(ApiError) as caught:
            parser = AutoParser("no-such-parser", tokenizer, tuple(TOOLS))
            parser.load() if use == "load" else parser.extract("x")
        assert caught.value.status == 501 and "no-such-parser" in caught.value.message
