"""What a response format may cost: the static bounds, and the sandboxed compile with its
memory and time limits, on the real compiler (llguidance) and the real tokenizer."""
from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings, strategies as st

from preprocess.contract import InvalidRequest
from preprocess.grammar.limits import MAX_SCHEMA_BOUND, MAX_SCHEMA_PRODUCT, check_schema_cost, pattern_bound
from preprocess.grammar.sandbox import GrammarSandbox

from ..conftest import EMBEDDED_MODEL

ARRAY = {"type": "array", "items": {"type": "integer"}}


@pytest.mark.parametrize("keyword", ["maxItems", "minItems", "maxLength", "minLength", "maxProperties",
                                     "minProperties", "maxContains", "minContains"])
def test_every_count_keyword_is_bounded_and_named(keyword):
    check_schema_cost({keyword: MAX_SCHEMA_BOUND})
    with pytest.raises(InvalidRequest, match=f"{keyword} is {MAX_SCHEMA_BOUND + 1}; the limit is {MAX_SCHEMA_BOUND}"):
        check_schema_cost({"properties": {"a": {keyword: MAX_SCHEMA_BOUND + 1}}})


def test_counts_multiply_through_nesting():
    inner = {**ARRAY, "maxItems": 1000}
    check_schema_cost({"type": "array", "maxItems": 1000, "items": inner})  # 10^6: at the limit
    with pytest.raises(InvalidRequest, match="multiply to 2000000"):
        check_schema_cost({"type": "array", "maxItems": 2000, "items": inner})
    with pytest.raises(InvalidRequest, match="multiply"):
        check_schema_cost({"anyOf": [{"type": "array", "maxItems": 5000, "items": {"type": "string", "maxLength": 500}}]})


@pytest.mark.parametrize("pattern, bound", [
    ("abc", 1), ("a{5}", 5), ("a{2,9}", 9), ("a{7,}", 7), ("(a{100}){100}", 10_000), ("(x|y{30}){3}", 90),
    ("a*b+", 1), (r"\{1000\}", 1), ("((a{10}){10}){10}", 1000),
])
def test_pattern_repetitions_multiply_through_groups(pattern, bound):
    assert pattern_bound(pattern) == bound


def test_a_pattern_over_the_bound_is_refused():
    with pytest.raises(InvalidRequest, match="pattern repeats up to 1000000 times"):
        check_schema_cost({"type": "string", "pattern": "(a{1000}){1000}"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "items", "maxItems", "minLength", "pattern", "properties", "anyOf", "$defs", "x"]),
        children, max_size=4),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(json_values)
@example({"maxItems": float("-inf")})  # found by CI: int(-inf) raised OverflowError, not a refusal
@example({"minLength": float("nan")})
def test_any_json_is_either_accepted_or_refused_by_name(schema):
    try:
        check_schema_cost(schema)
    except InvalidRequest as exc:
        assert "limit" in str(exc)


def test_a_deep_schema_is_walked_without_recursion():
    schema: dict = {"type": "integer"}
    for _ in range(5_000):  # past Python's recursion limit, within the subschema limit
        schema = {"items": schema}
    check_schema_cost(schema)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL)


def compile_error(sandbox: GrammarSandbox, schema) -> str | None:
    try:
        sandbox.check(json.dumps({"json": schema}))
    except InvalidRequest as exc:
        return str(exc)
    return None


def test_the_sandbox_refuses_what_the_engine_cannot_honour_and_takes_the_rest(tokenizer):
    sandbox = GrammarSandbox(tokenizer, memory_mb=1024, timeout_s=60)
    try:
        assert compile_error(sandbox, {**ARRAY, "maxItems": 10}) is None
        assert compile_error(sandbox, {"type": "object", "properties": {"a": {"type": "string"}}}) is None
        assert "no JSON text satisfies the schema" in compile_error(sandbox, {"$ref": "#"})
        looped = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
        assert "grammar engine refuses this schema" in compile_error(sandbox, looped)
        assert "grammar size" in compile_error(sandbox, {"anyOf": [{**ARRAY, "maxItems": 9999 - i} for i in range(90)]})
    finally:
        sandbox.stop()


def test_a_compile_past_the_memory_limit_ends_its_worker_and_the_next_one_serves(tokenizer):
    """The report's 1e9 maxItems grew a process to 18 GB. Here the static bounds are
    skipped (the sandbox gets the schema directly): the memory limit alone contains it."""
    sandbox = GrammarSandbox(tokenizer, memory_mb=128, timeout_s=60)
    try:
        error = compile_error(sandbox, {**ARRAY, "maxItems": 1_000_000_000})
        assert error is not None and "needs more than 128 MB (GRAMMAR_CHECK_MEMORY_MB)" in error
        assert sandbox._process is None  # ended
        assert compile_error(sandbox, {**ARRAY, "maxItems": 3}) is None  # a fresh worker
    finally:
        sandbox.stop()


def test_a_compile_past_the_time_limit_ends_its_worker(tokenizer):
    sandbox = GrammarSandbox(tokenizer, memory_mb=4096, timeout_s=0.05)
    try:
        sandbox._worker()  # started outside the timed compile
        error = compile_error(sandbox, {**ARRAY, "maxItems": 1_000_000})  # seconds of work
        assert error is not None and "takes more than 0.05 s (GRAMMAR_CHECK_TIMEOUT_S)" in error
    finally:
        sandbox.stop()


def test_results_are_cached_per_schema(tokenizer, monkeypatch):
    sandbox = GrammarSandbox(tokenizer, memory_mb=1024, timeout_s=60)
    try:
        text = json.dumps({"json": {"$ref": "#"}})
        with pytest.raises(InvalidRequest):
            sandbox.check(text)
        monkeypatch.setattr(sandbox, "_compile", lambda _: pytest.fail("compiled twice"))
        with pytest.raises(InvalidRequest, match="no JSON text"):
            sandbox.check(text)
    finally:
        sandbox.stop()


def test_without_a_fast_tokenizer_only_the_static_bounds_apply():
    sandbox = GrammarSandbox(object(), memory_mb=64, timeout_s=1)
    sandbox.check(json.dumps({"json": {"$ref": "#"}}))  # no compile, no error
    assert sandbox.unavailable


def test_bounds_hold_on_every_door_of_the_request(tokenizer):
    """The shim's reading and the generator's own check refuse the same schema."""
    from preprocess import controls

    hostile = {**ARRAY, "maxItems": MAX_SCHEMA_PRODUCT}
    with pytest.raises(InvalidRequest, match="maxItems"):
        controls.structured_output({"type": "json_schema", "json_schema": {"schema": hostile}})
    with pytest.raises(InvalidRequest, match="maxItems"):
        controls.structured_output_kwargs(json.dumps({"json": hostile}))
