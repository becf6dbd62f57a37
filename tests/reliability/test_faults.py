"""Faults while requests are in flight: kill a Python-backend stub, kill tritonserver.

(Killing the vLLM engine process is tests/test_generator_robustness.py.) For each: what the
clients saw (a quick 5xx JSON error or an answer, never a hang or a shorter list), how long
until GET / said ok again with no manual action, and that the next requests succeed.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

pytestmark = [pytest.mark.server, pytest.mark.faults]


def health(server):
    try:
        return server.get("/", timeout=2)[1].get("status")
    except OSError:
        return None


def fire_during(server, kill, clients=4):
    """Requests in flight while `kill` runs; returns what each client saw and the recovery time."""
    outcomes = []
    stop = threading.Event()

    def client(i):
        while not stop.is_set():
            started = time.monotonic()
            prompts = [f"fault {i} {n}" for n in range(8)]
            status, body = server.post("/predict", {"prompt": prompts, "max_new_tokens": 16}, timeout=120)
            outcomes.append((status, body, time.monotonic() - started))
            if status == 200:
                assert len(body["response"]) == 8  # never a shorter list
            else:
                time.sleep(0.2)  # a client backs off after an error

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    kill()
    killed_at = time.monotonic()
    deadline = killed_at + 240
    while time.monotonic() < deadline and health(server) == "ok":  # it must notice
        time.sleep(0.1)
    while time.monotonic() < deadline and health(server) != "ok":
        time.sleep(0.25)
    recovered_s = time.monotonic() - killed_at
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(180)
    return outcomes, recovered_s


def check(outcomes, recovered_s, what):
    errors = [(s, b, d) for s, b, d in outcomes if s != 200]
    for status, body, seconds in errors:
        assert status in (500, 502, 503, 504) and isinstance(body, dict) and body.get("error"), (status, body)
        assert seconds < 60, f"a client waited {seconds:.0f} s"
    print(f"\n{what}: {len(outcomes)} requests, {len(errors)} errors "
          f"({sorted({s for s, _, _ in errors})}), ok again {recovered_s:.1f} s after the kill")


def tritonserver_process(server):
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if child.name() == "tritonserver":
            return child
    raise AssertionError("no tritonserver under the serve process")


def test_kill_a_stub_while_serving(server):
    stub = next(p for p in tritonserver_process(server).children()
                if "triton_python_backend_stub" in p.name() and "postprocess" in " ".join(p.cmdline()))
    outcomes, recovered_s = fire_during(server, lambda: os.kill(stub.pid, signal.SIGKILL))
    check(outcomes, recovered_s, "postprocess stub killed")
    server.wait_ok()
    assert server.post("/predict", {"prompt": ["after", "stub"]})[0] == 200


def test_kill_tritonserver_while_serving(server):
    triton = tritonserver_process(server)
    outcomes, recovered_s = fire_during(server, lambda: os.kill(triton.pid, signal.SIGKILL))
    check(outcomes, recovered_s, "tritonserver killed")
    server.wait_ok()
    assert tritonserver_process(server).pid != triton.pid  # supervised: a new one
    assert server.post("/predict", {"prompt": ["after", "restart"]})[0] == 200
