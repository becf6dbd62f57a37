"""The work budget: prompt tokens counted as the preprocess stage makes them, the request
cap, and the server-wide ledger."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from preprocess import settings as cfg
from preprocess.chat import ChatFormatter
from shim.budget import PromptCounter, WorkLedger, check_request_work
from shim.errors import ApiError

from ..conftest import EMBEDDED_MODEL, REPO


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL)


@settings(max_examples=60, deadline=None)
@given(system=st.text(max_size=40), questions=st.lists(st.text(max_size=60), max_size=5))
def test_counts_are_the_token_ids_the_preprocess_stage_makes(tokenizer, system, questions):
    formatter = ChatFormatter(tokenizer)
    expected = [len(p.token_ids) for p in formatter.format_batch(system, questions)]
    assert PromptCounter(tokenizer).count(questions, system) == expected


def test_conversations_and_verbatim_prompts_are_counted_too(tokenizer):
    counter = PromptCounter(tokenizer)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "more"}]
    formatted = ChatFormatter(tokenizer).format_conversations([[("system", "S"), *((t["role"], t["content"])
                                                                                    for t in turns)]])
    assert counter.count([json.dumps(turns)], "S", row_input="messages") == [len(formatted[0].token_ids)]
    assert counter.count(["a b c"], "S", verbatim=True) == [len(tokenizer("a b c").input_ids)]
    assert PromptCounter(None).count(["héllo"], "S", verbatim=True) == [6]  # UTF-8 bytes: a bound
    assert counter.count([], "S") == counter.count([], "S", verbatim=True) == []


def test_the_judge_batch_at_the_routing_limits_fits_the_default_budget(tokenizer):
    """650 questions of the judge's kind, each allowed the largest routing limit."""
    defaults = cfg.load({})
    questions = [json.loads(line)["question"] for line in (REPO / "tests/data/judge_questions.jsonl").open()]
    batch = (questions * (650 // len(questions) + 1))[:650]
    counts = PromptCounter(tokenizer).count(batch, defaults.chat.system_prompt)
    work = check_request_work(counts, 1, defaults.largest_token_limit, defaults.shim.max_request_tokens)
    assert work <= defaults.shim.max_request_tokens / 4  # room to spare, and for four such batches queued
    assert 4 * work <= defaults.shim.max_queued_tokens


def test_the_request_cap_names_what_the_work_is_made_of():
    assert check_request_work([10, 20], 3, 5, 60) == 60
    with pytest.raises(ApiError) as caught:
        check_request_work([10, 20], 3, 5, 59)
    assert caught.value.status == 413
    assert "60 tokens of work (30 prompt tokens + 2 prompts x 3 choices x 5 new tokens)" in caught.value.message


def test_the_ledger_refuses_with_429_when_full_and_frees_what_ends():
    seen = []
    ledger = WorkLedger(100, seen.append)
    with ledger.reserve(60):
        with pytest.raises(ApiError) as caught:
            with ledger.reserve(41):
                pass
        assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "1"
        with ledger.reserve(40):
            assert ledger.queued == 100
    assert ledger.queued == 0 and seen == [60, 100, 60, 0]
    with ledger.reserve(500):  # alone, a request larger than the queue is still served
        assert ledger.queued == 500
    with pytest.raises(RuntimeError):
        with ledger.reserve(10):
            raise RuntimeError("a failed request")
    assert ledger.queued == 0
