"""Hostile input, round two, against the real server: each reproduction from the report,
with a one-word "victim" request beside it whose status and latency are checked, and the
server's memory, restart counter and tritonserver process checked after."""
from __future__ import annotations

import json
import threading
import time

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from .bench.cpu import generated_tokens
from .conftest import error_text, SESSION_QUEUE_BUDGET, SESSION_TOKEN_BUDGET, engine_in_slices, request_outcome, run_threads, \
    scrape_metrics, wait_for
from .test_hostile_input import tritonserver_pid

pytestmark = pytest.mark.server

# A request that must be answered while hostile work runs: one word, one token.
VICTIM = {"prompt": "hi", "max_new_tokens": 1}
# Seconds a victim may take. Generous for a shared 2-core machine: the reports measured
# 44.8 s (a victim behind prefill) and 3.1-20 s (behind a big reply) before the fixes.
VICTIM_LIMIT_S = 10.0


def with_victims(server, hostile) -> tuple[object, list]:
    """Run `hostile()` while victims are sent one after another until it returns; every
    victim is answered 200 within VICTIM_LIMIT_S. Returns hostile's result and the victims."""
    done, victims, result = threading.Event(), [], {}

    def run_hostile():
        try:
            result["value"] = hostile()
        finally:
            done.set()

    def run_victims():
        while True:
            victims.append(request_outcome("POST", server.url + "/predict", VICTIM, timeout=120))
            if done.is_set():
                return

    run_threads([run_hostile, run_victims], join_timeout_s=300)
    assert victims
    for victim in victims:
        assert victim.status == 200 and victim.body["response"], victim
        assert victim.seconds < VICTIM_LIMIT_S, f"a victim waited {victim.seconds:.1f} s"
    return result.get("value"), victims


def restarts(server) -> float:
    return scrape_metrics(server.url + "/metrics").get("llm_shim_server_restarts_total", 0.0)


def chat(schema, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, **extra}


# The report's 270-byte request (case 1) and its relatives: each count, and counts that
# multiply through nesting. Each is refused before any grammar compiler sees it.
HOSTILE_SCHEMAS = [
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 1000000000}, "maxItems"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 100000}, "minItems"),
    ({"type": "string", "maxLength": 10**12}, "maxLength"),
    ({"type": "string", "pattern": "^(a{1000}){1000}$"}, "pattern"),
    ({"type": "array", "maxItems": 5000, "items": {"type": "array", "maxItems": 5000, "items": {"type": "integer"}}},
     "multiply"),
]
# Schemas the grammar engine cannot honour (case 7): a 400 with its words, never "" and 200.
UNSATISFIABLE_SCHEMAS = [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
]


def test_schema_bounds_and_compile_failures_are_400s_and_the_generator_stays_small(server):
    generator = psutil.Process(server.generator_state()["pid"])
    rss_before = generator.memory_info().rss

    def hostile():
        replies = [server.post("/v1/chat/completions", chat(schema)) for schema, _ in HOSTILE_SCHEMAS]
        replies += [server.post("/v1/chat/completions", chat(schema)) for schema in UNSATISFIABLE_SCHEMAS]
        return replies

    replies, _ = with_victims(server, hostile)
    for (status, body), (_, keyword) in zip(replies, HOSTILE_SCHEMAS):
        assert status == 400 and keyword in error_text(body) and "the limit is" in error_text(body), body
    for status, body in replies[len(HOSTILE_SCHEMAS):]:
        assert status == 400 and "grammar engine refuses this schema" in error_text(body), body
    # The bound: the generator grew by less than 256 MB (the report: 16-18 GB, then killed).
    assert generator.memory_info().rss - rss_before < 256 * 2**20
    assert generator.is_running()
    # A schema within the bounds is still honoured.
    # Items from an enum bound the answer's length: it parses whole within 16 tokens, sampled or not.
    status, body = server.post("/v1/chat/completions", chat({"type": "array", "items": {"enum": [1, 2]}, "maxItems": 3},
                                                              raw=True, max_tokens=16, temperature=0))
    assert status == 200 and isinstance(json.loads(body["choices"][0]["message"]["content"] or "[]"), list), body


# Per route, (body, field) with "\ud800" in one text field each: as raw JSON, the way a client sends it.
SURROGATE = "\\ud800"
CHAT = '{"messages": [{"role": "user", "content": "hi"}], '
SURROGATE_IN_EVERY_FIELD = {
    "/predict": [('{"prompt": "%s"}', "prompt"), ('{"prompt": ["ok", "a%s"]}', "prompt[1]")],
    "/explain": [('{"prompt": "%s"}', "prompt")],
    "/v1/chat/completions": [
        ('{"messages": [{"role": "user", "content": "%s"}]}', "messages[0].content"),
        (CHAT + '"stop": ["%s"]}', "stop[0]"),
        (CHAT + '"user": "%s"}', "user"),
        (CHAT + '"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["%s"]}}}}',
         "response_format.json_schema.schema.enum[0]"),
        (CHAT + '"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
         '{"properties": {"%s": {}}}}}}', "(a key)"),
    ],
    "/v1/completions": [('{"prompt": "%s", "max_tokens": 1}', "prompt")],
    "/system_prompt": [('{"system_prompt": "%s"}', "system_prompt")],
}


def test_a_hostile_request_in_every_text_field_a_second_apart_restarts_nothing(server):
    """Case 2: eight lone surrogates in a schema, a second apart, restarted tritonserver.
    Here one goes into every text field, a second apart (10 s: past the restart rule's
    5-second window). Every text field now refuses them at the door, and the restart rule counts only the
    shim's own probes. (The positive control, a real death that does restart, is
    tests/reliability/test_faults.py::test_kill_a_stub_while_serving.)"""
    pid, restarts_before = tritonserver_pid(server), restarts(server)
    prompt_before = server.get("/system_prompt")[1]["system_prompt"]

    def hostile():
        outcomes = []
        for route, bodies in SURROGATE_IN_EVERY_FIELD.items():
            for template, field in bodies:
                outcomes.append((field, server.post(route, (template % SURROGATE).encode())))
                time.sleep(1.0)
        return outcomes

    outcomes, _ = with_victims(server, hostile)
    for field, (status, body) in outcomes:
        assert status == 400 and field in error_text(body) and "UTF-8" in error_text(body), (field, body)
    assert restarts(server) == restarts_before
    assert tritonserver_pid(server) == pid
    assert server.get("/system_prompt")[1]["system_prompt"] == prompt_before  # nothing stored
    assert server.health() == "ok"


def user(text) -> list:
    return [{"role": "user", "content": text}]


# Every text field of every route, as a body around one text.
TEXT_FIELDS = {
    "/predict prompt": ("/predict", lambda t: {"prompt": t, "max_new_tokens": 1}),
    "/predict prompt list": ("/predict", lambda t: {"prompt": ["ok", t], "max_new_tokens": 1}),
    "/explain prompt": ("/explain", lambda t: {"prompt": t}),
    "chat content": ("/v1/chat/completions", lambda t: {"messages": user(t), "max_tokens": 1}),
    "chat system turn": ("/v1/chat/completions", lambda t: {"messages": [{"role": "system", "content": t},
                                                                         *user("hi")], "max_tokens": 1}),
    "chat stop": ("/v1/chat/completions", lambda t: {"messages": user("hi"), "max_tokens": 1, "stop": [t]}),
    "chat user": ("/v1/chat/completions", lambda t: {"messages": user("hi"), "max_tokens": 1, "user": t}),
    "chat model": ("/v1/chat/completions", lambda t: {"messages": user("hi"), "max_tokens": 1, "model": t}),
    "chat schema value": ("/v1/chat/completions", lambda t: chat({"enum": [t]}, max_tokens=1)),
    "chat schema key": ("/v1/chat/completions", lambda t: chat({"type": "object", "properties": {t: {}}},
                                                               max_tokens=1)),
    "completion prompt": ("/v1/completions", lambda t: {"prompt": t, "max_tokens": 1}),
    "system prompt": ("/system_prompt", lambda t: {"system_prompt": t}),
}
# Any code point; lone surrogates (2,048 of 1.1 million) drawn often on purpose, and text
# that means something to a template.
any_text = st.lists(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
                    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
                    | st.sampled_from(["<|im_start|>", "<|im_end|>", "\x00", "\u202e", "{", "\\"]),
                    max_size=12).map("".join)


def test_arbitrary_unicode_in_every_text_field_is_served_or_refused_never_a_5xx(server):
    before = server.get("/system_prompt")[1]["system_prompt"]
    pid, restarts_before = tritonserver_pid(server), restarts(server)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(field=st.sampled_from(sorted(TEXT_FIELDS)), text=any_text)
    def one(field, text):
        route, body = TEXT_FIELDS[field]
        status, reply = server.post(route, json.dumps(body(text)).encode())  # lone surrogates as \ud800
        assert status is not None and status < 500, (field, text, status, reply)
        # JSON joins a high and a low surrogate in a row into one valid character: judge
        # the text the server reads.
        if any(0xD800 <= ord(c) <= 0xDFFF for c in json.loads(json.dumps(text))):
            assert status == 400 and "UTF-8" in error_text(reply), (field, reply)

    try:
        one()
    finally:
        server.post("/system_prompt", {"system_prompt": before})
    assert restarts(server) == restarts_before and tritonserver_pid(server) == pid
    assert server.post("/predict", VICTIM)[0] == 200


def test_system_prompt_is_tested_before_it_is_stored(server):
    """Case 3: a prompt that would make every later request fail is never stored."""
    before = server.get("/system_prompt")[1]["system_prompt"]

    def hostile():
        return [server.post("/system_prompt", {"system_prompt": "7" * 20_000}),  # inside the character limit
                server.post("/system_prompt", b'{"system_prompt": "\\ud800"}')]

    (long_one, surrogate), _ = with_victims(server, hostile)
    status, body = long_one
    assert status == 422 and "model length" in error_text(body) and "not stored" in error_text(body), body
    status, body = surrogate
    assert status == 400 and "system_prompt is not valid UTF-8" in error_text(body), body
    assert server.get("/system_prompt")[1]["system_prompt"] == before
    try:
        status, body = server.post("/system_prompt", {"system_prompt": ""})  # the default, as used
        assert status == 200 and body["system_prompt"] and server.get("/system_prompt")[1] == body
        assert server.post("/predict", VICTIM)[0] == 200
    finally:
        server.post("/system_prompt", {"system_prompt": before})


def test_prompt_tokens_count_toward_the_work_budget(server):
    """Case 4: long prompts with one new token each were counted as one token each."""
    word = server.post("/v1/completions", {"prompt": "why " * 100, "max_tokens": 1})[1]["usage"]["prompt_tokens"]
    prompts = ["why " * 100] * (SESSION_TOKEN_BUDGET // word + 1)

    def hostile():
        return [server.post("/predict", {"prompt": prompts, "max_new_tokens": 1}),
                server.post("/v1/completions", {"prompt": prompts, "max_tokens": 1})]

    (predicted, completed), _ = with_victims(server, hostile)
    for status, body in (predicted, completed):
        assert status == 413 and "prompt tokens" in error_text(body) and "SHIM_MAX_REQUEST_TOKENS" in error_text(body), body



def test_a_request_without_a_token_limit_is_counted_at_the_largest_routing_limit(server):
    """No max_new_tokens: the budget counts the largest limit routing may pick (the one
    /info lists), not one token; with a limit, that limit (the positive control)."""
    import re

    routing = server.get("/info")[1]["routing"]
    largest = max(v for k, v in routing.items() if k.startswith("max_new_tokens"))
    prompts = ["why " * 20] * (SESSION_TOKEN_BUDGET // 20 + 1)  # over the budget either way: nothing runs
    counted = {}
    for limit in (None, 1):
        status, body = server.post("/predict", {"prompt": prompts, **({} if limit is None else {"max_new_tokens": limit})})
        assert status == 413, body
        counted[limit] = int(re.search(r"x 1 choices x (\d+) new tokens", error_text(body)).group(1))
    assert counted == {None: largest, 1: 1}, counted

def test_a_full_queue_is_a_429_with_retry_after(server):
    """Work admitted and unanswered is bounded server-wide: past SHIM_MAX_QUEUED_TOKENS a
    request is refused at once, not queued, and the work in flight is still answered."""
    row = server.post("/explain", {"prompt": "why " * 200})[1]["prompt_tokens"] + 1  # and one new token
    rows = 22_000 // row
    body = {"prompt": ["why " * 200] * rows, "max_new_tokens": 1}
    work, held_count = rows * row, SESSION_QUEUE_BUDGET // (rows * row)  # as many as fit, then one more
    held, outcomes = [], []
    with engine_in_slices(server):
        def send():
            outcomes.append(request_outcome("POST", server.url + "/predict", body, timeout=240))

        for _ in range(held_count):
            thread = threading.Thread(target=send, daemon=True)
            thread.start()
            held.append(thread)
        queued = wait_for(lambda: scrape_metrics(server.url + "/metrics").get("llm_shim_queued_tokens", 0)
                          >= held_count * work, 120)
        assert queued, "the requests were never admitted together"
        refused = httpx.post(server.url + "/predict", json=body, timeout=60)
        assert refused.status_code == 429 and "SHIM_MAX_QUEUED_TOKENS" in error_text(refused.json()), refused.text
        assert int(refused.headers["retry-after"]) >= 1
    for thread in held:
        thread.join(240)
    assert [o.status for o in outcomes] == [200] * held_count, outcomes
    assert wait_for(lambda: scrape_metrics(server.url + "/metrics")["llm_shim_queued_tokens"] == 0, 60) is not None


def test_one_failed_chunk_ends_the_others_and_names_the_row_in_the_request(server):
    """Case 5: prompt 700 of 1,024 too long. The error names 700 (not 188, its place in its
    chunk), and the other chunk's 512 prompts are aborted in vLLM, not generated to the end."""
    chunk, tokens = 512, 16
    prompts = ["q"] * (2 * chunk)
    prompts[700] = "word " * 2000  # over the tiny model's 1,024 tokens
    before = generated_tokens(server.metrics_url)
    with engine_in_slices(server):  # the engine cannot finish the first chunk before the error
        (status, body), victims = with_victims(
            server, lambda: server.post("/v1/completions", {"prompt": prompts, "max_tokens": tokens}))
    assert status == 400 and error_text(body).startswith("prompt 700 "), body
    # A sentinel of the same shape, sent after: vLLM admits first come first served, so had
    # the first chunk gone on, its answers would be counted by the time the sentinel's are.
    status, _ = server.post("/v1/completions", {"prompt": ["q"] * chunk, "max_tokens": tokens})
    assert status == 200
    made_for_the_failed_request = generated_tokens(server.metrics_url) - before - chunk * tokens - len(victims)
    assert made_for_the_failed_request < chunk * tokens / 2, made_for_the_failed_request
