"""No request can hurt the engine, and a killed engine comes back on its own."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.server


def test_prompt_longer_than_the_model_is_refused_alone(server):
    too_long = "word " * 3000  # the tiny model's length is 1024 tokens
    with ThreadPoolExecutor(6) as pool:
        bad = pool.submit(server.post, "/predict", {"prompt": [too_long, "fine"]})
        good = [pool.submit(server.post, "/predict", {"prompt": f"question {i}"}) for i in range(5)]
        status, body = bad.result()
        assert status == 400 and "model length" in body["error"], body
        assert all(f.result()[0] == 200 for f in good)


def test_invalid_sampling_never_reaches_the_engine(server):
    for bad in ({"temperature": float("nan")}, {"top_k": -5}, {"top_p": 0.0}):
        status, _ = server.post("/predict", {"prompt": "x", **bad})
        assert 400 <= status < 500
    assert server.post("/predict", {"prompt": "after bad ones"})[0] == 200


def wait_for(predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return None


@pytest.mark.faults
def test_killed_engine_comes_back_without_a_restart(server):
    state = server.generator_state()
    engine_pid, stub_pid = state["engine_pid"], state["pid"]
    assert engine_pid and engine_pid != stub_pid
    os.kill(engine_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def health():
        try:
            return server.get("/", timeout=2)[1].get("status")
        except OSError:
            return None

    assert wait_for(lambda: health() == "warming", 15), "health never left ok after the engine died"
    # While it is down, requests fail fast with a 503, not a hang.
    started = time.monotonic()
    status, body = server.post("/predict", {"prompt": "during the outage"}, timeout=30)
    if status != 200:  # the new engine may already be up
        assert status == 503 and "error" in body
        assert time.monotonic() - started < 10
    assert wait_for(lambda: health() == "ok", 180), server.log_text()[-3000:]
    recovered_s = time.monotonic() - killed_at
    new_state = server.generator_state()
    assert new_state["pid"] == stub_pid  # same stub, same tritonserver: no restart
    assert new_state["engine_pid"] != engine_pid and new_state["restarts"] == 1
    assert server.post("/predict", {"prompt": ["after", "recovery"]})[0] == 200
    print(f"engine killed -> ok again in {recovered_s:.1f} s")


def test_client_disconnect_aborts_the_generation(server):
    import json

    server.wait_ok()
    import socket

    # The largest request the session's work budget allows: 16 prompts x 1000 tokens.
    body = json.dumps({"prompt": [f"write forever {i}" for i in range(16)], "max_new_tokens": 1000,
                       "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(1.5)
    sock.close()
    assert wait_for(lambda: "cancelled by the client; aborting" in server.log_text(), 15), \
        server.log_text()[-2000:]
    assert server.post("/predict", {"prompt": "next one"})[0] == 200
