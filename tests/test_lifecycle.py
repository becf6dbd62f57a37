"""A second server: the transformers backend through Triton, started by the Docker images'
entry script (outside Docker), and Ctrl-C leaving nothing behind."""
from __future__ import annotations

import signal
import sys
import threading

import psutil
import pytest

from .conftest import REPO, request_outcome, scrape_metrics, server_env, start_server, wait_for

pytestmark = pytest.mark.server


def test_entry_script_falls_back_to_transformers_loudly_and_ctrl_c_stops_everything(tiny_model):
    """The images' entry, with a vLLM that cannot start (a real vLLM error: no awq weights for
    this model): transformers serves, and every operator-facing surface says so."""
    # The images run docker/entrypoint.sh on their own Python; here that Python is the venv's.
    env = server_env(tiny_model, USE_VLLM="true", VLLM_QUANTIZATION="awq", PYTHON=sys.executable)
    server = start_server(env, "server-transformers.log", command=[str(REPO / "docker" / "entrypoint.sh")])
    try:
        info = server.get("/info")[1]
        assert info["backend"] == "transformers"
        assert info["engine_fallback"].startswith("vLLM did not start: ValidationError") and \
            "Cannot find the config file for awq" in info["engine_fallback"], info["engine_fallback"]
        health = server.get("/")[1]  # the judge's status values, and the fallback beside them
        assert health == {"status": "batch", "engine": "transformers", "engine_fallback": info["engine_fallback"]}
        assert wait_for(lambda: scrape_metrics(server.url + "/metrics").get("llm_engine_fallback") == 1.0, 30)
        slow = [line for line in server.log_text().splitlines() if "SLOW: serving with transformers" in line]
        assert len(slow) == 1 and "Cannot find the config file for awq" in slow[0], slow
        assert info["batch_mode"] is True  # docker/run_model.sh, the entry's default preset, applied
        status, body = server.post("/predict", {"prompt": ["hello", "世界"], "max_new_tokens": 3})
        assert status == 200 and len(body["response"]) == 2
        tree = psutil.Process(server.process.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "tritonserver" in names and "triton_python_backend_stub" in names
    finally:
        server.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        server.process.wait(60)
    gone, alive = psutil.wait_procs(tree, timeout=60)  # a bound: returns as soon as all are gone
    assert not alive, [p.cmdline() for p in alive]


def test_sigterm_drains_the_batch_in_flight_refuses_new_work_and_leaves_nothing(tiny_model):
    """A rolling update's SIGTERM: readiness 503 at once, a new request 503 with Retry-After,
    the batch already in flight answered whole, then every process gone. The generator is
    paused (SIGSTOP) while the signal arrives, so the batch is in flight on any machine."""
    env = server_env(tiny_model, USE_VLLM="false", PYTHON=sys.executable, SHIM_DRAIN_S="120")
    server = start_server(env, "server-drain.log", command=[str(REPO / "docker" / "entrypoint.sh")])
    # Readiness said 503 while the server warmed up, and 200 once it served.
    assert (503, "warming") in server.readiness_seen and server.readiness_seen[-1] == (200, "batch")
    tree = psutil.Process(server.process.pid).children(recursive=True)
    generator = psutil.Process(server.generator_state()["pid"])
    prompts = [f"drained {k}" for k in range(8)]
    outcome = []
    generator.suspend()
    try:
        batch = threading.Thread(target=lambda: outcome.append(request_outcome(
            "POST", server.url + "/predict", {"prompt": prompts, "max_new_tokens": 4}, timeout=300)))
        batch.start()
        assert wait_for(lambda: scrape_metrics(server.url + "/metrics").get("llm_shim_queued_tokens", 0) > 0, 60), \
            "the batch was never admitted"
        server.process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: server.get("/health/ready", timeout=5) == (503, {"status": "draining"}), 60)
        refused = request_outcome("POST", server.url + "/predict", {"prompt": "late"}, timeout=60)
        assert refused.status == 503 and "shutting down" in refused.body["error"], refused
        assert server.get("/")[1] == {"status": "draining"}  # the judge's GET / still answers 200
    finally:
        generator.resume()
    batch.join(300)
    assert outcome and outcome[0].status == 200 and len(outcome[0].body["response"]) == len(prompts), outcome
    server.process.wait(120)
    gone, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    assert "draining; 1 request(s) in flight" in server.log_text()
