"""Faults while requests are in flight: kill a Python-backend stub, kill tritonserver.

(Killing the vLLM engine process is tests/test_generator_robustness.py.) For each: what the
clients saw (a 5xx JSON error or a full answer, never a hang past the client's 120 s timeout,
a dropped connection or a shorter list), that health noticed and came back to ok with no
manual action, who healed it, and that the next requests succeed. Every client outcome is
recorded and judged here, after the threads are joined.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import psutil
import pytest

from tests.conftest import request_outcome, run_threads, scrape_metrics, wait_for

pytestmark = [pytest.mark.server, pytest.mark.faults]

PROMPTS_PER_REQUEST = 8


def seconds_until(server, wanted, since: float, deadline: float) -> float | None:
    """Seconds from `since` until health says what `wanted` accepts; None past the deadline."""
    return wait_for(lambda: time.monotonic() - since if wanted(server.health()) else None,
                    deadline - time.monotonic())


def fire_during(server, kill, clients=4):
    """Requests in flight while `kill` runs; returns every outcome, and when health noticed and recovered."""
    outcomes = []
    stop = threading.Event()

    def client(i):
        n = 0
        while not stop.is_set():
            prompts = [f"fault {i} {n} {k}" for k in range(PROMPTS_PER_REQUEST)]
            outcomes.append(request_outcome("POST", server.url + "/predict",
                                            {"prompt": prompts, "max_new_tokens": 16}, timeout=120))
            n += 1
            if outcomes[-1].status != 200:
                time.sleep(0.2)  # a client backs off after an error

    def driver():
        time.sleep(1.0)
        kill()
        killed_at = time.monotonic()
        deadline = killed_at + 240
        # A health call that times out on a starved machine says nothing either way.
        timeline["noticed_s"] = seconds_until(server, lambda s: s not in ("ok", None), killed_at, deadline)
        timeline["recovered_s"] = seconds_until(server, lambda s: s == "ok", killed_at, deadline)
        time.sleep(1.0)
        stop.set()

    timeline = {}
    run_threads([driver, *(lambda i=i: client(i) for i in range(clients))], join_timeout_s=420)
    return outcomes, timeline


def check(outcomes, timeline, what):
    assert timeline["noticed_s"] is not None, f"{what}: health never left ok"
    assert timeline["recovered_s"] is not None, f"{what}: health never came back to ok"
    assert outcomes, "no request was made"
    for o in outcomes:
        assert o.error is None, f"{what}: a client met {o.error} after {o.seconds:.1f} s"
        if o.status == 200:
            assert len(o.body["response"]) == PROMPTS_PER_REQUEST  # never a shorter list
        else:
            assert o.status in (502, 503) and isinstance(o.body, dict) and o.body.get("error"), o
    errors = [o.status for o in outcomes if o.status != 200]
    print(f"\n{what}: {len(outcomes)} requests, {len(errors)} errors ({sorted(set(errors))}), "
          f"noticed after {timeline['noticed_s']:.1f} s, ok again {timeline['recovered_s']:.1f} s after the kill")


def tritonserver_process(server):
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if child.name() == "tritonserver":
            return child
    raise AssertionError("no tritonserver under the serve process")


def test_kill_a_stub_while_serving(server):
    """A dead stub leaves Triton 'ready' while every request fails: only the shim's restart
    rule (every request failing for 5 s) heals it, so a new tritonserver must appear."""
    triton = tritonserver_process(server)
    restarts_before = server.log_text().count("restarting tritonserver")
    metrics_before = scrape_metrics(server.url + "/metrics")
    stub = next(p for p in triton.children()
                if "triton_python_backend_stub" in p.name() and "postprocess" in " ".join(p.cmdline()))
    outcomes, timeline = fire_during(server, lambda: os.kill(stub.pid, signal.SIGKILL))
    check(outcomes, timeline, "postprocess stub killed")
    assert server.log_text().count("restarting tritonserver") == restarts_before + 1
    # The positive control of "a client's 5xx never restarts by itself": the shim's own probes
    # failed 3 times in a row (the 5 s window: tests/unit/test_error_classes.py), and the counters say so.
    failing = re.findall(r"fails although Triton says ready \((\d+) in a row\)", server.log_text())
    assert failing and int(failing[-1]) >= 3
    metrics_after = scrape_metrics(server.url + "/metrics")
    delta = {name: metrics_after.get(name, 0.0) - metrics_before.get(name, 0.0)
             for name in ("llm_shim_server_restarts_total", "llm_shim_model_failures_total")}
    assert delta["llm_shim_server_restarts_total"] == 1
    assert delta["llm_shim_model_failures_total"] >= 3
    assert tritonserver_process(server).pid != triton.pid
    assert server.post("/predict", {"prompt": ["after", "stub"]})[0] == 200


def test_kill_tritonserver_while_serving(server):
    triton = tritonserver_process(server)
    outcomes, timeline = fire_during(server, lambda: os.kill(triton.pid, signal.SIGKILL))
    check(outcomes, timeline, "tritonserver killed")
    server.wait_ok()
    assert tritonserver_process(server).pid != triton.pid  # supervised: a new one
    assert "tritonserver exited with" in server.log_text()  # the supervisor healed it
    assert server.post("/predict", {"prompt": ["after", "restart"]})[0] == 200
