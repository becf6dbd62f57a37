"""No request can hurt the engine, and a killed engine comes back on its own."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import engine_in_slices, over_replicas, request_outcome, run_threads, scrape_metrics, wait_for
from .conftest import error_text

pytestmark = pytest.mark.server


def test_prompt_longer_than_the_model_is_refused_alone(server):
    too_long = "word " * 3000  # the tiny model's length is 1024 tokens
    with ThreadPoolExecutor(6) as pool:
        bad = pool.submit(server.post, "/predict", {"prompt": [too_long, "fine"]})
        good = [pool.submit(server.post, "/predict", {"prompt": f"question {i}"}) for i in range(5)]
        status, body = bad.result()
        assert status == 400 and "model length" in error_text(body), body
        assert all(f.result()[0] == 200 for f in good)


def test_invalid_sampling_never_reaches_the_engine(server):
    for bad in ({"temperature": float("nan")}, {"top_k": -5}, {"top_p": 0.0}):
        status, _ = server.post("/predict", {"prompt": "x", **bad})
        assert 400 <= status < 500
    assert server.post("/predict", {"prompt": "after bad ones"})[0] == 200


def test_the_engine_shares_the_shims_session(server):
    """Linux with autogroup (the default) schedules each session as one group. With the engine
    in a session of its own (a setsid'd tritonserver), a 2-core machine left a process of
    another session waiting on the run queue for 1-4 s while the engine generated, so every
    piece of a stream reached the shim at once, at its end. So the shim starts tritonserver
    in a process group of its own, for killing it whole, but in the shim's session."""
    state = server.generator_state()
    shim_session = os.getsid(server.process.pid)
    assert os.getsid(state["pid"]) == shim_session and os.getsid(state["engine_pid"]) == shim_session
    assert os.getpgid(state["pid"]) != os.getpgid(server.process.pid)  # Ctrl-C reaches the shim only


@pytest.mark.faults
def test_killed_engine_comes_back_without_a_restart_and_the_batches_in_flight_whole(server):
    """The generator rebuilds its engine by itself, and sends the batches in flight again,
    once, to the new engine: each comes back whole. Nothing of it trips the shim's restart
    rule (that would reload every model). A request that arrives during the outage gets 503."""
    state = server.generator_state()
    engine_pid, stub_pid = state["engine_pid"], state["pid"]
    assert engine_pid and engine_pid != stub_pid
    restarts_before = server.log_text().count("restarting tritonserver")
    failed_streams = 'llm_generator_streams_total{outcome=failed}'
    failed_before = over_replicas(scrape_metrics(server.metrics_url)).get(failed_streams, 0.0)
    outcomes = []

    def batch_client(i):
        outcomes.append(request_outcome("POST", server.url + "/predict",
                                        {"prompt": [f"in flight {i} {k}" for k in range(8)], "max_new_tokens": 200,
                                         "ignore_eos": True}, timeout=300))

    def stream_client():
        # A stream in flight when the engine dies ends with an error event and [DONE]: no hang.
        # The kill comes as soon as its first piece arrives, with most of its tokens still to make.
        body = {"messages": [{"role": "user", "content": "stream on"}], "max_tokens": 900, "stream": True, "raw": True,
                "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as reply:
                streamed.append(reply.status_code)
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        streamed.append(line.removeprefix("data: "))
                        stream_started.set()
        finally:
            stream_started.set()

    def kill_then_probe():
        # Records only: an assertion here would end the thread, not the test (judged after the join).
        probe["stream started"] = stream_started.wait(60)
        if not probe["stream started"]:
            return
        os.kill(engine_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        probe["left ok"] = wait_for(lambda: server.health() == "warming", 60)
        if not probe["left ok"]:
            return
        # While it is down, requests fail fast with a 503, not a hang.
        probe["during"] = request_outcome("POST", server.url + "/predict", {"prompt": "during the outage"}, timeout=30)
        probe["ready after it"] = server.generator_state()["ready"]  # the answer came while the engine was down
        probe["back"] = wait_for(lambda: server.health() == "ok", 180)
        probe["recovered_s"] = time.monotonic() - killed_at

    probe, streamed, stream_started = {}, [], threading.Event()
    # The engine runs in slices until it is killed, so the stream is still generating when the
    # kill lands, on any machine (its rebuilt successor is a new process, not sliced).
    with engine_in_slices(server):
        run_threads([kill_then_probe, stream_client, *(lambda i=i: batch_client(i) for i in range(4))],
                    join_timeout_s=300)
    assert probe.get("stream started"), "the stream never started"
    assert probe.get("left ok"), "health never left ok after the engine died"
    assert probe.get("back"), server.log_text()[-3000:]
    during, engine_ready_after_it, recovered_s = probe["during"], probe["ready after it"], probe["recovered_s"]
    assert during.status == 503 and "error" in during.body and not engine_ready_after_it, during
    assert len(outcomes) == 4 and all(o.error is None and o.status == 200 and len(o.body["response"]) == 8
                                      for o in outcomes), outcomes
    assert "submitting 8 prompt(s) again" in server.log_text()  # they were in flight when it died
    status, *events = streamed
    assert status == 200 and events[-1] == "[DONE]", streamed[:3] + streamed[-3:]
    last = json.loads(events[-2])
    # The engine died under the stream: the client is told to retry, and the stream ends,
    # counted as failed (the README's streams_total{outcome="failed"}).
    assert last.get("error", {}).get("type") == "service_unavailable", streamed[-3:]
    assert wait_for(lambda: over_replicas(scrape_metrics(server.metrics_url)).get(failed_streams, 0.0)
                    == failed_before + 1, 30), "the failed stream was not counted"
    new_state = server.generator_state()
    assert new_state["pid"] == stub_pid  # same stub, same tritonserver: no restart
    assert new_state["engine_pid"] != engine_pid and new_state["restarts"] == 1
    assert new_state["backend"] == "vllm"  # rebuilt as vLLM, not fallen back to transformers
    assert server.log_text().count("restarting tritonserver") == restarts_before
    assert server.post("/predict", {"prompt": ["after", "recovery"]})[0] == 200
    print(f"engine killed -> ok again in {recovered_s:.1f} s; in-flight: {sorted(o.status for o in outcomes)}")


def engine_tokens(server) -> float:
    """vLLM's own count of generated tokens, step by step: an aborted request's tokens count
    as they are made, where llm_generator_generation_tokens_total counts finished answers."""
    return over_replicas(scrape_metrics(server.metrics_url)).get("vllm:generation_tokens_total", 0.0)


def settled_engine_tokens(server, bound_s: float = 600) -> float:
    """The count once two reads a second apart agree: the engine has stopped generating.
    A broken abort keeps it growing until the whole request is made, then it settles."""
    deadline = time.monotonic() + bound_s
    last = engine_tokens(server)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = engine_tokens(server)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the engine was still generating after {bound_s} s")


def test_a_single_request_finishes_before_a_maximal_one_started_earlier(server):
    """The work budget bounds the largest request; while one runs, a second client's short
    request is served alongside it, not after it (shown by the order they finish in). The
    short one is sent once the engine is generating the maximal one (vLLM's token count), not
    after a fixed sleep."""
    finished = []
    before = settled_engine_tokens(server)

    def maximal():
        got = request_outcome("POST", server.url + "/predict",
                              {"prompt": [f"long {k}" for k in range(16)], "max_new_tokens": 1000, "ignore_eos": True},
                              timeout=300)
        finished.append(("maximal", got.status))

    def single():
        if not wait_for(lambda: engine_tokens(server) > before, 120):
            finished.append(("single", "the maximal request never started"))
            return
        got = request_outcome("POST", server.url + "/predict", {"prompt": "short one", "max_new_tokens": 4},
                              timeout=300)
        finished.append(("single", got.status))

    run_threads([maximal, single], join_timeout_s=300)
    assert finished == [("single", 200), ("maximal", 200)]


# Large requests within the session's work budget (16 rows x 1000 tokens), each with
# ignore_eos and a prompt short enough (system prompt and template included, under 300
# tokens) that every row makes all 700 tokens within the tiny model's 1,024: the whole
# request makes exactly `full` tokens, an aborted one fewer.
DISCONNECTS = [
    ("/predict", {"prompt": [f"write forever {i}" for i in range(16)], "max_new_tokens": 700, "ignore_eos": True},
     11_200, "cancelled by the client; aborted"),
    ("/v1/completions", {"prompt": "write forever", "n": 16, "max_tokens": 700, "ignore_eos": True},
     11_200, "cancelled by the client; aborted"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "write forever"}], "n": 16,
                              "max_tokens": 700, "ignore_eos": True}, 11_200, "cancelled by the client; aborted"),
    ("/v1/completions", {"prompt": "write forever", "stream": True, "max_tokens": 700, "ignore_eos": True},
     700, "aborting"),
]


@pytest.mark.parametrize("route, body, full, log_line", DISCONNECTS,
                         ids=["predict", "completions", "chat", "completions-stream"])
def test_client_disconnect_aborts_the_generation(server, route, body, full, log_line):
    """Proved by vLLM's token count: the request makes fewer tokens than it would whole.
    The client leaves once the engine has started on it (bounded by work, not a sleep)."""
    import socket

    server.wait_ok()
    marks = server.log_text().count(log_line)
    before = settled_engine_tokens(server)
    raw = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                 + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    assert wait_for(lambda: engine_tokens(server) > before, 120), "the engine never started on the request"
    sock.close()
    assert wait_for(lambda: server.log_text().count(log_line) > marks, 60), server.log_text()[-2000:]
    made = settled_engine_tokens(server) - before
    assert 0 < made < full, f"{made} tokens of {full}: the generation was not aborted"
    assert server.post("/predict", {"prompt": "next one"})[0] == 200
