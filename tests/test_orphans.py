"""Engines die with their server, however it dies: no process of the old server and no
shared-memory segment it made outlive it. With vLLM (the engine processes are what outlives
a killed stub), after `kill -9` of a plain tritonserver and after Ctrl-C of the serve entry.
The plain tritonserver runs with VLLM_ENGINE_STATS=0 and first answers one request, which
shows the figures that come only from vLLM's per-step statistics staying empty.
"""
from __future__ import annotations

import os
import signal
import sys

import psutil
import pytest

from .conftest import http_json, scrape_metrics, server_env, start_server, wait_for
from .shm_hygiene import KINDS, names_in_use, shm_names
from .test_replicas import PlainTriton

pytestmark = pytest.mark.server

BOUND_S = 60  # the guard polls each second and gives SIGTERM 5 s; a bound on slow machines, not a wait


def engine_tree(root_pid: int) -> list[psutil.Process]:
    tree = psutil.Process(root_pid).children(recursive=True)
    titles = [" ".join(p.cmdline()) for p in tree]
    assert any("EngineCore" in t for t in titles), titles  # vLLM runs: its engine is in the tree
    assert any("orphan_guard" in t for t in titles), titles
    return tree


def assert_nothing_left(tree: list[psutil.Process], shm_before: set[str]) -> None:
    _, alive = psutil.wait_procs(tree, timeout=BOUND_S)
    assert not alive, [(p.pid, " ".join(p.cmdline())) for p in alive if p.is_running()]

    def orphaned_segments():
        return {n for n in shm_names() - shm_before if n.startswith(KINDS)} - names_in_use()
    assert wait_for(lambda: not orphaned_segments(), 10), sorted(orphaned_segments())


def figures_without_engine_stats(triton) -> None:
    """docs/operations.md, Metrics: with VLLM_ENGINE_STATS=0, time to first token, the KV
    blocks in use and vLLM's step-by-step figures stay empty, while the generator's own
    counts go on (the positive control; with the statistics on, tests/test_metrics.py sees
    time to first token counted for the same kind of request)."""
    import numpy as np
    import tritonclient.http as triton_http

    metrics_url = f"http://127.0.0.1:{triton.ports[2]}/metrics"
    client = triton_http.InferenceServerClient(f"127.0.0.1:{triton.ports[0]}")
    prompt = triton_http.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"hello"]], dtype=np.object_))
    answer = client.infer("llm", [prompt]).as_numpy("answer").reshape(-1)[0].decode()
    assert answer == " ".join(["GPU"] * 8)  # MAX_NEW_TOKENS of the test servers
    figures = wait_for(lambda: (m := scrape_metrics(metrics_url)).get(
        "llm_generator_e2e_latency_seconds_count{replica=0}", 0) >= 1 and m, 30)
    assert figures, "the request's figures never arrived"
    assert figures["llm_generator_prompts_total{replica=0}"] == 1
    assert figures["llm_generator_generation_tokens_total{replica=0}"] == 8
    assert figures.get("llm_generator_time_to_first_token_seconds_count{replica=0}", 0) == 0
    assert figures.get("llm_generator_kv_cache_blocks_used{replica=0}", 0) == 0
    assert "vllm:kv_cache_usage_perc{replica=0}" not in figures or figures["vllm:kv_cache_usage_perc{replica=0}"] == 0
    assert figures.get("vllm:generation_tokens_total{replica=0}", 0) == 0


def test_kill_9_of_a_plain_tritonserver_leaves_no_engine_and_no_shared_memory(tiny_model):
    shm_before = shm_names()
    triton = PlainTriton(server_env(tiny_model, USE_VLLM="true", VLLM_ENGINE_STATS="0"))
    triton.start()
    try:
        ready = f"http://127.0.0.1:{triton.ports[0]}/v2/health/ready"

        def is_ready():
            try:
                return http_json("GET", ready, timeout=2)[0] == 200
            except OSError:
                return False
        assert wait_for(is_ready, 300), "tritonserver never ready"
        figures_without_engine_stats(triton)
        tree = engine_tree(triton.process.pid)  # `exec tritonserver`: the shell's pid is tritonserver's
        os.kill(triton.process.pid, signal.SIGKILL)
        # Reaped, as its parent (a shell, tini) would: a zombie parent still answers the stubs'
        # "is my parent alive" check, and they would wait for it forever.
        triton.process.wait(BOUND_S)
        assert_nothing_left(tree, shm_before)
    finally:
        triton.stop()


def test_ctrl_c_of_the_serve_entry_leaves_no_engine_and_no_shared_memory(tiny_model):
    shm_before = shm_names()
    server = start_server(server_env(tiny_model, USE_VLLM="true"), "server-orphans.log",
                          [sys.executable, "-m", "shim.serve"])  # what ./build.sh serve runs
    tree = engine_tree(server.process.pid)
    server.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    server.process.wait(BOUND_S)
    assert_nothing_left(tree, shm_before)
