"""Whole conversations through the preprocess stage, and the text request controls.

Properties over arbitrary conversations (the embedded model's real tokenizer and template):
every turn's text reaches the prompt ids as plain text, in order, between the template's
own ids; no turn adds a special token; routing reads the last user turn.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from preprocess import controls
from preprocess.chat import Turn
from preprocess.contract import NOT_SET, InvalidRequest
from preprocess.conversation import MAX_TURNS, read_messages
from preprocess.preprocess_stage import PreprocessStage, RequestRows
from preprocess.routing import Route
from preprocess.settings import load

from .test_role_isolation import special_ids, texts

roles = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
turn = st.fixed_dictionaries({"role": roles, "content": texts})
conversations = st.lists(turn, min_size=1, max_size=5).map(lambda t: [*t, {"role": "user", "content": "last?"}])


@pytest.fixture(scope="module")
def stage(tokenizer):
    return PreprocessStage(load({}), tokenizer)


def one(stage, **columns):
    return stage.prepare(RequestRows(**{"prompts": [None], **columns}))[0]


def plain(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids if text else []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=conversations)
def test_every_turn_reaches_the_model_as_plain_text_in_order(stage, tokenizer, turns):
    row = one(stage, messages=[json.dumps(turns)])
    seen = [(("system" if t["role"] == "developer" else t["role"]), t["content"]) for t in turns]
    if not any(role == "system" for role, _ in seen):
        seen.insert(0, ("system", stage.default_system_prompt))
    pieces = stage.formatter.pieces([Turn(role, text) for role, text in seen])
    own = stage.formatter.piece_ids(pieces)
    expected = list(own[0])
    for i, (_, text) in enumerate(seen):
        expected += plain(tokenizer, text) + list(own[i + 1])
    assert row.token_ids == expected
    specials = special_ids(tokenizer)
    assert sum(i in specials for i in row.token_ids) == sum(i in specials for piece in own for i in piece)


def test_routing_reads_the_last_user_turn(stage):
    code = "给出核心代码"
    routed = one(stage, messages=[json.dumps([{"role": "user", "content": code},
                                              {"role": "assistant", "content": "ok"},
                                              {"role": "user", "content": "What is HBM?"}])])
    assert routed.decision.route is not Route.CODE and not routed.decision.is_code
    last = one(stage, messages=[json.dumps([{"role": "user", "content": "hi"}, {"role": "user", "content": code}])])
    assert last.decision.is_code


def test_a_question_and_the_same_conversation_give_the_same_prompt(stage):
    question = stage.prepare(RequestRows(["What is HBM?"]))[0]
    conversation = one(stage, messages=[json.dumps([{"role": "user", "content": "What is HBM?"}])])
    assert conversation.token_ids == question.token_ids and conversation.decision == question.decision


@pytest.mark.parametrize("messages, problem", [
    ("[]", "non-empty array"), ("{}", "non-empty array"), ("[1]", "messages[0][0].role"),
    ('[{"role": "robot", "content": "x"}]', "role must be one of"),
    ('[{"role": "user", "content": 5}]', "content must be a string"),
    ('[{"role": "assistant", "content": "x"}]', "no message with role 'user'"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"), ("not json", "not valid JSON"),
    (json.dumps([{"role": "user", "content": "x"}] * (MAX_TURNS + 1)), f"the limit is {MAX_TURNS}"),
])
def test_a_bad_conversation_is_refused_naming_the_problem(stage, messages, problem):
    with pytest.raises(InvalidRequest, match=problem.replace("[", r"\[").replace("]", r"\]")):
        one(stage, messages=[messages])


def test_a_verbatim_prompt_skips_template_routing_and_clean_up(stage, tokenizer):
    row = stage.prepare(RequestRows(["<|im_start|>user\nhi"], verbatim=[True]))[0]
    assert row.token_ids == tokenizer("<|im_start|>user\nhi").input_ids and row.decision.route is Route.RAW
    with pytest.raises(InvalidRequest, match="verbatim applies to a prompt"):
        one(stage, messages=['[{"role": "user", "content": "x"}]'], verbatim=[True])


def test_controls_reach_the_sampling_settings(stage):
    row = stage.prepare(RequestRows(["q"], seed=[7], top_logprobs=[20], stop=['["a", "b", "a"]'],
                                    response_format=['{"type": "json_object"}'],
                                    overrides={"presence_penalty": [0.5]}))[0]
    s = row.sampling
    assert (s.seed, s.top_logprobs, s.stop, s.presence_penalty) == (7, 20, ("a", "b"), 0.5)
    assert controls.structured_output_kwargs(s.response_format) == {"json_object": True}
    plain_row = stage.prepare(RequestRows(["q"]))[0].sampling
    assert (plain_row.seed, plain_row.top_logprobs, plain_row.stop, plain_row.response_format) == (
        NOT_SET, NOT_SET, (), "")


@pytest.mark.parametrize("value, problem", [
    (["a"] * (controls.MAX_STOP_STRINGS + 1), "the limit is"), ([""], r"stop\[0\]"),
    (["x" * (controls.MAX_STOP_CHARS + 1)], r"stop\[0\]"), ([1], "list of strings"),
])
def test_bad_stop_strings_are_refused(value, problem):
    with pytest.raises(InvalidRequest, match=problem):
        controls.stop_strings(value)
    assert controls.stop_strings(["x" * controls.MAX_STOP_CHARS] * controls.MAX_STOP_STRINGS)


@pytest.mark.parametrize("value, problem", [
    ({"type": "xml"}, "response_format.type"), ({"type": "json_schema"}, "schema"),
    ({"type": "json_schema", "json_schema": {"schema": "x"}}, "schema"), ("text", "must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * controls.MAX_RESPONSE_FORMAT_CHARS]}}},
     "the limit is"),
])
def test_bad_response_formats_are_refused(value, problem):
    with pytest.raises(InvalidRequest, match=problem):
        controls.structured_output(value)


def test_the_generator_rechecks_what_a_direct_client_sends():
    for bad in ('{"grammar": "x"}', '{"json": 1}', "[]", '{"json": {}, "json_object": true}'):
        with pytest.raises(InvalidRequest, match="RESPONSE_FORMAT"):
            controls.structured_output_kwargs(bad)
    assert controls.structured_output({"type": "text"}) == "" and controls.structured_output(None) == ""


def test_read_messages_maps_developer_to_system():
    assert read_messages([{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}]) == [
        Turn("system", "d"), Turn("user", "u")]
